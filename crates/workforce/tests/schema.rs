//! `schemas/task-graph.schema.json` must be exactly what the types generate, and the example
//! graphs must parse.

use std::path::PathBuf;

#[test]
fn published_task_graph_schema_matches_the_types() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas/task-graph.schema.json");
    let expected =
        serde_json::to_string_pretty(&agent_runtime_workforce::graph::task_graph_schema()).unwrap()
            + "\n";
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &expected).unwrap();
        return;
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} differs from the types; run UPDATE_SCHEMAS=1 cargo test -p agent-runtime-workforce --test schema",
        path.display()
    );
}

#[test]
fn example_graphs_are_valid() {
    // Other files in examples/ (gateway configuration, policies) are not task graphs.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["hello.yaml", "failure-policies.yaml", "agents.json"] {
        let graph =
            agent_runtime_workforce::load_graph(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
        // A live run starts its engine from the loaded graph; replay and resume from the copy in
        // `run.created`: the two must be the same graph.
        let created = agent_runtime_workforce::engine::Engine::created_event(
            agent_runtime_core::RunId::from_bytes([1; 16]),
            &graph,
            7,
            agent_runtime_core::Timestamp::from_unix_nanos(0),
        );
        let back = agent_runtime_workforce::engine::graph_of_created(&created.payload).unwrap();
        assert_eq!(
            back, graph,
            "{name}: the graph changes in its JSON round trip"
        );
        // `run.created` writes the graph with `write_canonical`; its digest is of those bytes
        // and must be the one of the graph's JSON value.
        assert_eq!(
            created.payload["digest"],
            agent_runtime_workforce::graph::digest_of_json(&serde_json::to_value(&graph).unwrap()),
            "{name}"
        );
    }
}
