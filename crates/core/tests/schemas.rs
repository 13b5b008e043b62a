//! The files in `schemas/` must be exactly what the types generate.

use std::path::PathBuf;

#[test]
fn published_schemas_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut stale = Vec::new();
    for (name, schema) in agent_runtime_core::schema::published_schemas() {
        let path = dir.join(name);
        let expected = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        if update {
            std::fs::write(&path, &expected).unwrap();
            continue;
        }
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        if actual != expected {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "schemas differ from the types: {stale:?}; run UPDATE_SCHEMAS=1 cargo test -p agent-runtime-core --test schemas"
    );
}

#[test]
fn a_sealed_envelope_validates_against_its_schema_shape() {
    // The schema names every field the serializer writes.
    let schema = agent_runtime_core::schema::schema_of::<agent_runtime_core::Envelope>();
    let props = schema["properties"].as_object().unwrap();
    for field in [
        "seq",
        "run_id",
        "task_id",
        "actor",
        "kind",
        "time",
        "payload",
        "prev_hash",
        "hash",
    ] {
        assert!(props.contains_key(field), "schema lacks {field}");
    }
}
