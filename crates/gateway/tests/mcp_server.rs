//! The MCP server (streamable HTTP) driven by the gateway's own MCP client: both ends `rmcp`,
//! policy applied on the serving side.

use std::sync::Arc;
use std::time::Duration;

use agent_runtime_core::{Actor, CallContext, CancellationToken, ErrorClass, EventKind, MemoryLog};
use agent_runtime_gateway::mcp::server::serve_http;
use agent_runtime_gateway::mcp::{McpConfig, McpManager, McpServerConfig};
use agent_runtime_gateway::{GatewayBuilder, Policy, Redactor, Registry, builtin};
use serde_json::json;

#[tokio::test]
async fn the_registry_served_over_streamable_http() {
    // The serving gateway: builtins plus a write tool the policy will judge.
    let registry = Arc::new(Registry::new());
    for t in builtin::builtins() {
        registry.register(t).unwrap();
    }
    let served_log = Arc::new(MemoryLog::default());
    let ws = tempfile::tempdir().unwrap();
    let served = GatewayBuilder::new(registry, served_log.clone())
        .policy(Policy::defaults(vec![ws.path().to_path_buf()]).unwrap())
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(serve_http(
        served,
        Actor::Agent("remote".into()),
        "127.0.0.1:0",
        stop.clone(),
        Some(tx),
    ));
    let addr = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();

    // The calling gateway sees the served tools as `remote.*`.
    let config = McpConfig {
        servers: [(
            "remote".to_string(),
            McpServerConfig {
                url: Some(format!("http://{addr}/mcp")),
                timeout_ms: Some(10_000),
                ..McpServerConfig::default()
            },
        )]
        .into_iter()
        .collect(),
    };
    let reg = Arc::new(Registry::new());
    let (manager, errors) = McpManager::start(&config, reg.clone(), &mut Redactor::new())
        .await
        .unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(reg.names(), ["remote.builtin.echo", "remote.builtin.noop"]);
    let remote = reg.get("remote.builtin.echo").unwrap();
    assert_eq!(
        remote.descriptor().risk,
        agent_runtime_core::RiskClass::Read
    );
    let ctx = CallContext::new(Actor::Agent("caller".into()));
    let out = remote
        .tool()
        .call(json!({"text": "round trip"}), ctx.clone())
        .await
        .unwrap();
    assert_eq!(out.value, json!("round trip"));
    // The serving side validates too, and says what is wrong.
    let err = remote
        .tool()
        .call(json!({"nope": 1}), ctx)
        .await
        .unwrap_err();
    assert_eq!(err.class, ErrorClass::ToolError);
    assert!(err.message.contains("invalid_arguments"), "{err}");
    // Both calls are in the serving side's log, made by the served actor.
    let completed = served_log
        .all()
        .iter()
        .filter(|e| e.kind == EventKind::ToolCompleted)
        .count();
    assert_eq!(completed, 1);
    assert!(
        served_log
            .all()
            .iter()
            .any(|e| e.actor == Actor::Agent("remote".into()))
    );
    manager.shutdown().await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// The endpoint has no authentication, so an address other machines can reach is refused,
/// naming it, and nothing is served.
#[tokio::test]
async fn an_address_beyond_loopback_is_refused() {
    let served = GatewayBuilder::new(Arc::new(Registry::new()), Arc::new(MemoryLog::default()))
        .build()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        serve_http(
            served,
            Actor::Agent("remote".into()),
            "0.0.0.0:0",
            CancellationToken::new(),
            Some(tx),
        ),
    )
    .await
    .expect("refused at once")
    .unwrap_err()
    .to_string();
    assert!(err.contains("refusing to serve on 0.0.0.0:"), "{err}");
    assert!(err.contains("loopback addresses only"), "{err}");
    assert!(rx.await.is_err(), "no address was handed out");
}
