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

/// A simulated run's `run.created` holds its configuration, and replay and resume rebuild the
/// graph from it: a forged or damaged size is refused, naming the field, before anything is
/// built.
#[test]
fn a_recorded_simulation_past_the_bounds_is_refused() {
    use agent_runtime_workforce::sim::{Shape, SimConfig};
    let ok = SimConfig::new(3, 20, Shape::Chain, 0.0, 1);
    let payload =
        |cfg: &SimConfig| serde_json::json!({"name": "sim", "seed": 1, "simulation": cfg});
    let graph = agent_runtime_workforce::engine::graph_of_created(&payload(&ok)).unwrap();
    assert_eq!(graph.tasks.len(), 20);
    for (bad, says) in [
        (
            SimConfig {
                tasks: u32::MAX,
                ..ok.clone()
            },
            "tasks is 4294967295",
        ),
        (
            SimConfig {
                agents: 0,
                ..ok.clone()
            },
            "agents is 0",
        ),
        (
            SimConfig {
                max_ms: u64::MAX,
                ..ok.clone()
            },
            "max_ms",
        ),
        (
            SimConfig {
                min_ms: 5,
                max_ms: 4,
                ..ok.clone()
            },
            "min_ms",
        ),
        (
            SimConfig {
                batch: 0,
                ..ok.clone()
            },
            "batch is 0",
        ),
        (
            SimConfig {
                failure_rate: 2.0,
                ..ok.clone()
            },
            "failure_rate is 2",
        ),
    ] {
        let err = agent_runtime_workforce::engine::graph_of_created(&payload(&bad)).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("run.created's simulation") && err.contains(says),
            "{err}"
        );
    }
}
