//! The MCP server: the registry, policy applied, for any MCP host.
//!
//! `tools/list` lists every registry tool (risk classes become annotations: `read` sets
//! `readOnlyHint`, `network` sets `openWorldHint`); `tools/call` goes through the whole gateway
//! pipeline as `agent:mcp` (or the name given), so validation errors, policy denials and
//! approval refusals come back as tool results with `isError: true` and a message the model can
//! act on. Progress is forwarded when the request carries a progress token; a
//! `notifications/cancelled` cancels the call.

use agent_runtime_core::{Actor, CallContext, RiskClass, ToolDescriptor};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::gateway::Gateway;

/// The gateway as an MCP server handler.
#[derive(Clone, Debug)]
pub struct GatewayServer {
    gateway: Gateway,
    actor: Actor,
    in_flight: std::sync::Arc<InFlight>,
    /// Cancels every call at once (the server was told to stop).
    stop: agent_runtime_core::CancellationToken,
}

/// The calls a server is running, so that a session that ends can wait for their outcomes to
/// be recorded (the SDK cancels them, and each records `tool.failed`) before the process ends.
#[derive(Debug, Default)]
struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One call counted in [`InFlight`] while it lives.
struct Counted(std::sync::Arc<InFlight>);

impl Counted {
    fn new(in_flight: &std::sync::Arc<InFlight>) -> Counted {
        in_flight
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Counted(in_flight.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl GatewayServer {
    /// A server exposing `gateway`'s registry; calls are made as `actor`.
    pub fn new(gateway: Gateway, actor: Actor) -> Self {
        GatewayServer {
            gateway,
            actor,
            in_flight: Default::default(),
            stop: agent_runtime_core::CancellationToken::new(),
        }
    }

    /// This server with its calls cancelled as soon as `stop` is (a signal), rather than when
    /// the SDK gives up on them.
    pub fn stopped_by(mut self, stop: &agent_runtime_core::CancellationToken) -> Self {
        self.stop = stop.child_token();
        self
    }

    /// Waits until no call runs, at most `max`.
    pub async fn settled(&self, max: std::time::Duration) {
        let until = tokio::time::Instant::now() + max;
        loop {
            let idle = self.in_flight.idle.notified();
            if self
                .in_flight
                .count
                .load(std::sync::atomic::Ordering::Acquire)
                == 0
            {
                return;
            }
            if tokio::time::timeout_at(until, idle).await.is_err() {
                return;
            }
        }
    }

    fn tools(&self) -> Result<ListToolsResult, McpError> {
        let tools: Vec<Value> = self.gateway.descriptors().iter().map(tool_json).collect();
        serde_json::from_value(json!({ "tools": tools }))
            .map_err(|e| McpError::internal_error(format!("cannot list tools: {e}"), None))
    }

    async fn call(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let _counted = Counted::new(&self.in_flight);
        let mut ctx = CallContext::new(self.actor.clone());
        // Cancelled by the client (`notifications/cancelled`, through the SDK) or by the
        // server's stop, whichever comes first.
        ctx.cancel = self.stop.child_token();
        let link = {
            let (by_client, cancel) = (context.ct.clone(), ctx.cancel.clone());
            tokio::spawn(async move {
                by_client.cancelled().await;
                cancel.cancel();
            })
        };
        let _unlink = crate::child::AbortOnDrop(link);
        let args = Value::Object(request.arguments.unwrap_or_default());
        let forward = match context.meta.get_progress_token() {
            Some(token) => {
                let (tx, mut rx) =
                    tokio::sync::mpsc::unbounded_channel::<agent_runtime_core::Progress>();
                ctx.progress = Some(tx);
                let peer = context.peer.clone();
                Some(tokio::spawn(async move {
                    while let Some(p) = rx.recv().await {
                        let mut n = ProgressNotificationParam::new(token.clone(), p.done);
                        n.total = p.total;
                        n.message = p.message;
                        let _ = peer.notify_progress(n).await;
                    }
                }))
            }
            None => None,
        };
        let result = self.gateway.call(&request.name, args, ctx).await;
        if let Some(mut f) = forward {
            // The call's context (and with it the progress sender) is gone now, so the forwarder
            // ends once it has sent what is queued: let it, so that every progress notification
            // reaches the client before the result does. Bounded, in case a sender lingers.
            if tokio::time::timeout(std::time::Duration::from_secs(1), &mut f)
                .await
                .is_err()
            {
                f.abort();
            }
        }
        let body = match result {
            Ok(out) => {
                let text = match &out.value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                // A result cut to the gateway's output limit says so where a client and a
                // model both see it: in the text, and in `_meta`.
                let text = if out.truncated {
                    format!("{text}\n[truncated: the output was over the gateway's limit]")
                } else {
                    text
                };
                let mut r = json!({"content": [{"type": "text", "text": text}], "isError": false});
                if out.value.is_object() {
                    r["structuredContent"] = out.value.clone();
                }
                if out.truncated {
                    r["_meta"] = json!({"agent-runtime/truncated": true});
                }
                r
            }
            Err(e) => {
                json!({"content": [{"type": "text", "text": format!("{}: {}", e.class, e.message)}],
                            "isError": true})
            }
        };
        let result: CallToolResult = serde_json::from_value(body).map_err(|e| {
            McpError::internal_error(format!("cannot encode the result: {e}"), None)
        })?;
        Ok(CallToolResponse::Complete(result))
    }
}

fn tool_json(d: &ToolDescriptor) -> Value {
    // MCP requires `"type": "object"`; a schema without a type (`{}`, or `true`) gets it.
    let schema = match &d.input_schema {
        Value::Object(o) if o.contains_key("type") => d.input_schema.clone(),
        Value::Object(o) => {
            let mut o = o.clone();
            o.insert("type".into(), json!("object"));
            Value::Object(o)
        }
        _ => json!({"type": "object"}),
    };
    let mut t = json!({
        "name": d.name,
        "description": d.description,
        "inputSchema": schema,
        "annotations": {
            "readOnlyHint": d.risk == RiskClass::Read,
            "destructiveHint": matches!(d.risk, RiskClass::Write | RiskClass::Exec),
            "openWorldHint": d.risk == RiskClass::Network,
        },
    });
    if let Some(o) = d
        .output_schema
        .as_ref()
        .filter(|o| o.get("type") == Some(&json!("object")))
    {
        t["outputSchema"] = o.clone();
    }
    t
}

impl ServerHandler for GatewayServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "agent-runtime",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Tools of the agent-runtime gateway; every call is checked by policy and recorded.",
            )
    }

    fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> impl Future<Output = Result<ListToolsResult, McpError>> + Send + '_ {
        std::future::ready(self.tools())
    }

    fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> impl Future<Output = Result<CallToolResponse, McpError>> + Send + '_ {
        self.call(request, context)
    }

    /// A request the SDK could not read as one it knows comes here. For the methods this
    /// server implements that means their params are malformed: JSON-RPC's "invalid params"
    /// (-32602), where the SDK would answer "method not found" (-32601) and send a client
    /// looking for a method that is there. The message describes the params expected without
    /// quoting the ones sent (they may hold secrets).
    fn on_custom_request(
        &self,
        request: rmcp::model::CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> impl Future<Output = Result<rmcp::model::CustomResult, McpError>> + Send + '_ {
        let expected = match request.method.as_str() {
            "tools/call" => Some(
                "invalid params for tools/call: expected an object with `name` (a string) and \
                 optionally `arguments` (an object)",
            ),
            _ => None,
        };
        std::future::ready(Err(match expected {
            Some(message) => McpError::invalid_params(message, None),
            None => McpError::new(
                rmcp::model::ErrorCode::METHOD_NOT_FOUND,
                request.method,
                None,
            ),
        }))
    }
}

/// Serves `gateway` over this process's stdin and stdout until the client disconnects.
pub async fn serve_stdio(gateway: Gateway, actor: Actor) -> Result<(), GatewayError> {
    serve_stdio_until(gateway, actor, agent_runtime_core::CancellationToken::new()).await
}

/// [`serve_stdio`] until `stop` is cancelled too (the CLI cancels it on SIGTERM and Ctrl-C):
/// then the input ends as if the client had closed it, so the calls in flight are cancelled
/// and their outcomes recorded before it returns. Lines that do not parse are answered with a
/// JSON-RPC parse error, notifications before `initialize` are dropped, and the session ends
/// when stdout cannot be written.
pub async fn serve_stdio_until(
    gateway: Gateway,
    actor: Actor,
    stop: agent_runtime_core::CancellationToken,
) -> Result<(), GatewayError> {
    let err = |m: String| GatewayError::Serve {
        transport: "stdio".into(),
        message: m,
    };
    let calls_stop = stop.child_token();
    let server = GatewayServer::new(gateway, actor).stopped_by(&calls_stop);
    let calls = server.clone();
    let served = super::stdio::framed(
        tokio::io::stdin(),
        tokio::io::stdout(),
        stop,
        calls_stop,
        |sdk_in, sdk_out| async move {
            let running = match server.serve((sdk_in, sdk_out)).await {
                Ok(running) => running,
                // The client left before initializing: nothing was served, nothing is wrong.
                Err(rmcp::service::ServerInitializeError::ConnectionClosed(_)) => return Ok(()),
                Err(e) => return Err(err(format!("the client's initialize failed: {e}"))),
            };
            running.waiting().await.map_err(|e| err(e.to_string()))?;
            Ok(())
        },
    )
    .await;
    // The session has ended and cancelled its calls: let them record their outcomes.
    calls.settled(SETTLE).await;
    served
}

/// How long a session that ended waits for its cancelled calls to record their outcomes (a
/// sandboxed command gets SIGTERM, then SIGKILL after a grace period).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `gateway` as a streamable HTTP MCP endpoint on `addr` (for example `127.0.0.1:8808`)
/// until `stop` is cancelled. `bound` receives the address actually bound (useful with port 0).
///
/// Only loopback addresses are served (the endpoint has no authentication), and only loopback
/// `Host` headers accepted (protection against DNS rebinding), as the SDK does by default.
pub async fn serve_http(
    gateway: Gateway,
    actor: Actor,
    addr: &str,
    stop: agent_runtime_core::CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), GatewayError> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
    let err = |m: String| GatewayError::Serve {
        transport: format!("http {addr}"),
        message: m,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| err(format!("cannot listen: {e}")))?;
    let local = listener.local_addr().map_err(|e| err(e.to_string()))?;
    // The endpoint has no authentication: anyone who can reach it calls the tools as `actor`
    // (the `Host` check stops DNS rebinding, not a client that sets the header itself).
    if !local.ip().is_loopback() {
        return Err(err(format!(
            "refusing to serve on {local}: the MCP endpoint has no authentication, so it listens \
             on loopback addresses only (127.0.0.1, [::1]); put a proxy with authentication in \
             front of it to reach it from elsewhere"
        )));
    }
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let mut config = StreamableHttpServerConfig::default();
    config.cancellation_token = stop.child_token();
    let server = GatewayServer::new(gateway, actor).stopped_by(&stop);
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        std::sync::Arc::new(LocalSessionManager::default()),
        config,
    );
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r.map_err(|e| err(format!("accept: {e}")))?,
            _ = stop.cancelled() => return Ok(()),
        };
        let service = service.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, hyper_util::service::TowerToHyperService::new(service));
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MCP requires `"type": "object"`: a schema without a type gets it, others keep theirs.
    #[test]
    fn a_listed_input_schema_always_has_its_type() {
        let mut d = crate::builtin::builtins()[0].descriptor().clone();
        for (schema, listed) in [
            (json!({}), json!({"type": "object"})),
            (
                json!({"properties": {"a": {}}}),
                json!({"type": "object", "properties": {"a": {}}}),
            ),
            (json!(true), json!({"type": "object"})),
            (
                json!({"type": "object", "required": ["a"]}),
                json!({"type": "object", "required": ["a"]}),
            ),
        ] {
            d.input_schema = schema;
            assert_eq!(tool_json(&d)["inputSchema"], listed);
        }
    }
}
