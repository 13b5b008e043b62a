//! The data key wrapped by a key in the OS keyring, against a real Secret Service
//! (gnome-keyring on a private D-Bus session bus that this test starts).

mod common;

use std::process::{Child, Command, Stdio};

use agent_runtime_store::{KEYRING_SERVICE, Store, StoreConfig, StoreError};
use common::*;

struct Daemons {
    children: Vec<Child>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn need(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is missing: install Debian's dbus-daemon and gnome-keyring (bash scripts/test-deps.sh does)"
    );
}

/// Starts a session bus and an unlocked gnome-keyring on it, and points this process at them.
fn start_secret_service(home: &std::path::Path) -> Daemons {
    need("dbus-daemon");
    need("gnome-keyring-daemon");
    // The session configuration without its service directories: a probe sent before the
    // daemon below owns its name then fails at once, where the standard configuration would
    // start another gnome-keyring for it (locked, since nobody unlocks it), which takes the
    // name from ours: the test failed that way on a loaded machine.
    let config = home.join("bus.conf");
    // The bus's socket goes in the test's own folder, removed with it: `unix:tmpdir=/tmp` left
    // a `dbus-*` socket file in /tmp at every run.
    std::fs::write(
        &config,
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir=HOME</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#
        .replace("HOME", &home.display().to_string()),
    )
    .expect("write the bus configuration");
    let mut bus = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", config.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = bus.stdout.take().expect("bus stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("bus address");
    }
    let address = line.trim().to_string();
    // SAFETY: this test binary runs this one test; no other thread reads the environment yet.
    unsafe {
        std::env::set_var("DBUS_SESSION_BUS_ADDRESS", &address);
        std::env::set_var("HOME", home);
        std::env::set_var("XDG_DATA_HOME", home.join("data"));
        std::env::set_var("XDG_RUNTIME_DIR", home);
    }
    let mut keyring = Command::new("gnome-keyring-daemon")
        .args(["--unlock", "--components=secrets", "--foreground"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gnome-keyring-daemon");
    {
        use std::io::Write;
        let mut stdin = keyring.stdin.take().expect("keyring stdin");
        stdin.write_all(b"login-password").expect("unlock keyring");
    }
    // Wait until the Secret Service stores and returns a secret (it starts asynchronously).
    let probe = keyring::Entry::new("agent-runtime-test", "readiness-probe").expect("probe entry");
    let mut ready = false;
    for _ in 0..200 {
        if probe.set_password("probe").is_ok() && probe.get_password().is_ok() {
            let _ = probe.delete_credential();
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        ready,
        "gnome-keyring did not come up on the private session bus within 10 s"
    );
    Daemons {
        children: vec![keyring, bus],
    }
}

#[test]
fn data_key_in_the_os_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let _daemons = start_secret_service(dir.path());
    let path = dir.path().join("k.db");

    // No passphrase: the key goes to the keyring.
    let store = Store::open(StoreConfig::new(&path)).expect("create with the OS keyring");
    assert!(store.is_encrypted());
    store.append_blocking(events(1, 50)).unwrap();
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let source: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE key = 'key_source'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let key_id: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(conn);
    assert_eq!(source, b"os-keyring");

    // Reopened with no passphrase: the keyring gives the key back.
    let store = Store::open(StoreConfig::new(&path)).unwrap();
    assert_eq!(store.verify().unwrap().events, 50);
    drop(store);

    // The key gone from the keyring: a clear error naming the database.
    let account = format!("event-log-key-{}", String::from_utf8(key_id).unwrap());
    keyring::Entry::new(KEYRING_SERVICE, &account)
        .unwrap()
        .delete_credential()
        .unwrap();
    let err = Store::open(StoreConfig::new(&path)).unwrap_err();
    assert!(matches!(err, StoreError::Keyring { .. }), "{err}");
    assert!(err.to_string().contains("k.db"), "{err}");

    // A passphrase, when given, is used instead of the keyring.
    let p = dir.path().join("p.db");
    drop(open_encrypted(&p));
    let conn = rusqlite::Connection::open(&p).unwrap();
    let source: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE key = 'key_source'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(source, b"passphrase-argon2id");

    // Eight threads create one database at once: each builds a copy with a key of its own in
    // the keyring, one copy is linked into place, and the others' keys are removed with them.
    let raced = dir.path().join("raced.db");
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                barrier.wait();
                Store::open(StoreConfig::new(&raced)).expect("every creator opens it");
            });
        }
    });
    let conn = rusqlite::Connection::open(&raced).unwrap();
    let key_id: Vec<u8> = conn
        .query_row("SELECT value FROM meta WHERE key = 'key_id'", [], |r| {
            r.get(0)
        })
        .unwrap();
    drop(conn);
    let raced_account = format!("event-log-key-{}", String::from_utf8(key_id).unwrap());
    let mut accounts = database_keys();
    accounts.sort();
    assert!(
        accounts.contains(&raced_account),
        "the database's key is kept: {accounts:?}"
    );
    // The keyring holds the raced database's key and the first one's (deleted above) no more:
    // none of the seven losers' keys.
    assert_eq!(accounts, vec![raced_account], "keys left in the keyring");
    assert!(Store::open(StoreConfig::new(&raced)).is_ok());
}

/// The accounts of the database keys in the Secret Service (`event-log-key-ID`).
fn database_keys() -> Vec<String> {
    use dbus_secret_service::{EncryptionType, SecretService};
    let ss = SecretService::connect(EncryptionType::Plain).expect("connect to the Secret Service");
    let found = ss
        .search_items(std::collections::HashMap::from([(
            "service",
            KEYRING_SERVICE,
        )]))
        .expect("search the Secret Service");
    found
        .unlocked
        .iter()
        .chain(&found.locked)
        .filter_map(|item| item.get_attributes().ok()?.remove("username"))
        .filter(|account| account.starts_with("event-log-key-"))
        .collect()
}
