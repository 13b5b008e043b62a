//! Time as a dependency.
//!
//! Nothing in the runtime reads the wall clock directly: it asks a [`Clock`]. Live runs use
//! [`SystemClock`]; tests and the simulator use [`ManualClock`], which only moves when told to,
//! so the timestamps that enter the event log are reproducible.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time: nanoseconds since the Unix epoch (UTC).
///
/// In JSON it is an RFC 3339 string with nanoseconds (`"2026-11-27T14:36:53.000000001Z"`), because
/// a nanosecond count does not fit a JavaScript number. In the canonical hashing form it is the
/// big-endian `u64` of nanoseconds.
///
/// ```
/// use agent_runtime_core::Timestamp;
/// let t: Timestamp = "2026-01-02T03:04:05.000000006Z".parse().unwrap();
/// assert_eq!(t.to_string(), "2026-01-02T03:04:05.000000006Z");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The Unix epoch, where a [`ManualClock`] starts unless told otherwise.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From nanoseconds since the Unix epoch.
    pub const fn from_unix_nanos(nanos: u64) -> Self {
        Timestamp(nanos)
    }

    /// Nanoseconds since the Unix epoch.
    pub const fn as_unix_nanos(self) -> u64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (what time-ordered ids carry).
    pub const fn as_unix_millis(self) -> u64 {
        self.0 / 1_000_000
    }

    /// This time plus `d`, saturating at the far future.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// How long from `earlier` to `self`; zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_nanos(self.to_system_time())
        )
    }
}

/// The error for a string that is not an RFC 3339 UTC time.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid timestamp {:?}: expected RFC 3339 such as 2026-01-02T03:04:05Z ({reason})",
    crate::names::shown(input)
)]
pub struct TimestampError {
    input: String,
    reason: String,
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| TimestampError {
            input: s.to_string(),
            reason,
        };
        // The parser reads no year before 1970. The last day of 1969 west of Greenwich can
        // still be 1970 in UTC (`1969-12-31T23:00:00-02:00`): it is read as the first day of
        // 1970, a day earlier.
        let mut day_before = false;
        let year_1969;
        let s = match s.get(..4).and_then(|y| y.parse::<u32>().ok()) {
            Some(y) if y < 1970 => match s.strip_prefix("1969-12-31") {
                Some(rest) if s.is_char_boundary(10) => {
                    day_before = true;
                    year_1969 = format!("1970-01-01{rest}");
                    year_1969.as_str()
                }
                _ => return Err(err("before 1970".into())),
            },
            _ => s,
        };
        // RFC 3339 allows a lower-case `t` and `z` and a numeric offset; the parser takes `T`
        // and `Z` alone.
        let upper_t;
        let s_norm = if s.as_bytes().get(10) == Some(&b't') && s.is_char_boundary(11) {
            upper_t = format!("{}T{}", &s[..10], &s[11..]);
            upper_t.as_str()
        } else {
            s
        };
        let (utc, offset_secs) = split_offset(s_norm);
        let st = humantime::parse_rfc3339_weak(&utc).map_err(|e| err(e.to_string()))?;
        let d = st
            .duration_since(UNIX_EPOCH)
            .map_err(|_| err("before 1970".into()))?;
        let nanos = i128::try_from(d.as_nanos()).unwrap_or(i128::MAX)
            - i128::from(offset_secs) * 1_000_000_000
            - if day_before {
                86_400 * 1_000_000_000
            } else {
                0
            };
        if nanos < 0 {
            return Err(err("before 1970".into()));
        }
        let nanos = u64::try_from(nanos).map_err(|_| err("after year 2554".into()))?;
        Ok(Timestamp(nanos))
    }
}

/// `s` with its zone written as `Z`, and the offset it had east of UTC in seconds: `z` and
/// `+00:00` are `Z`; `+01:00` is an hour east (so UTC is an hour earlier). Text without a
/// zone, or with one that is not an offset, is returned as it is, for the parser to judge.
fn split_offset(s: &str) -> (std::borrow::Cow<'_, str>, i64) {
    if let Some(base) = s.strip_suffix('z') {
        return (format!("{base}Z").into(), 0);
    }
    let b = s.as_bytes();
    let n = b.len();
    // `...T03:04:05+01:00`: the offset comes after the time's seconds.
    if n >= 6
        && s.contains(['T', 't', ' '])
        && matches!(b[n - 6], b'+' | b'-')
        && b[n - 3] == b':'
        && [n - 5, n - 4, n - 2, n - 1]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
        && s[..n - 6]
            .rfind(':')
            .is_some_and(|colon| colon > s[..n - 6].find(['T', 't', ' ']).unwrap_or(n))
    {
        let digits = |i: usize| i64::from(b[i] - b'0');
        let (hours, minutes) = (
            digits(n - 5) * 10 + digits(n - 4),
            digits(n - 2) * 10 + digits(n - 1),
        );
        // An offset out of range (`+25:99`) is left for the parser to refuse.
        if hours <= 23 && minutes <= 59 {
            let sign = if b[n - 6] == b'-' { -1 } else { 1 };
            return (
                format!("{}Z", &s[..n - 6]).into(),
                sign * (hours * 3600 + minutes * 60),
            );
        }
    }
    (s.into(), 0)
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Timestamp {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Timestamp".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 UTC time with up to nine fractional digits"
        })
    }
}

/// A source of the current time.
///
/// Implementations must be cheap to call and monotonic enough for ordering events: a clock that
/// goes backwards produces events whose times go backwards, which the log accepts but which makes
/// time-range queries surprising.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to: the simulator's virtual clock and the tests' clock.
///
/// Clones share the same time.
///
/// ```
/// use agent_runtime_core::{Clock, ManualClock, Timestamp};
/// use std::time::Duration;
/// let clock = ManualClock::new(Timestamp::EPOCH);
/// clock.advance(Duration::from_millis(5));
/// assert_eq!(clock.now().as_unix_millis(), 5);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(start.0)),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let add = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(add, Ordering::SeqCst);
    }

    /// Sets the clock to `t` (which may be earlier: the caller owns time).
    pub fn set(&self, t: Timestamp) {
        self.nanos.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst))
    }
}

/// The calling thread's CPU time so far, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`), or `None`
/// where the platform has no per-thread CPU clock. For measurements only (the simulator's
/// scheduler figure, the store writer's busy time): never recorded in an event.
///
/// ```
/// let before = agent_runtime_core::thread_cpu_ns();
/// let mut x = 0u64;
/// for i in 0..1_000_000u64 { x = x.wrapping_add(i * i); }
/// std::hint::black_box(x);
/// if let (Some(a), Some(b)) = (before, agent_runtime_core::thread_cpu_ns()) {
///     assert!(b >= a);
/// }
/// ```
pub fn thread_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    return cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
    #[cfg(not(unix))]
    None
}

/// The whole process's CPU time so far (every thread, user and system), in nanoseconds
/// (`CLOCK_PROCESS_CPUTIME_ID`), or `None` where the platform has no such clock. For
/// measurements only, like [`thread_cpu_ns`].
pub fn process_cpu_ns() -> Option<u64> {
    #[cfg(unix)]
    return cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
    #[cfg(not(unix))]
    None
}

#[cfg(unix)]
fn cpu_clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clock ids are constants Linux and macOS
    // define.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::Timestamp;

    fn parse(s: &str) -> Result<u64, String> {
        s.parse::<Timestamp>()
            .map(|t| t.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn rfc_3339_zones_are_read() {
        let utc = parse("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(parse("2026-01-02T03:04:05z").unwrap(), utc);
        assert_eq!(parse("2026-01-02t03:04:05z").unwrap(), utc);
        assert_eq!(parse("2026-01-02T03:04:05+00:00").unwrap(), utc);
        assert_eq!(parse("2026-01-02T04:04:05+01:00").unwrap(), utc);
        assert_eq!(parse("2026-01-01T22:04:05-05:00").unwrap(), utc);
        assert_eq!(
            parse("2026-01-02T04:04:05.5+01:00").unwrap(),
            utc + 500_000_000
        );
        assert!(
            parse("1969-12-31T23:59:59Z")
                .unwrap_err()
                .contains("before 1970")
        );
        assert!(
            parse("1970-01-01T00:30:00+01:00")
                .unwrap_err()
                .contains("before 1970")
        );
        // The last day of 1969 west of Greenwich may be 1970 in UTC.
        assert_eq!(
            parse("1969-12-31T23:00:00-02:00").unwrap(),
            parse("1970-01-01T01:00:00Z").unwrap()
        );
        assert_eq!(parse("1969-12-31t22:00:00.25-02:00").unwrap(), 250_000_000);
        for before in [
            "1969-12-31T23:00:00-00:30",
            "1969-12-31T23:00:00Z",
            "1969-12-30T23:00:00-02:00",
            "0001-01-01T00:00:00Z",
        ] {
            assert!(
                parse(before).unwrap_err().contains("before 1970"),
                "{before}"
            );
        }
        assert!(parse("2026-01-02").is_err());
        assert!(parse("2026-01-02T03:04:05+25:99").is_err());
    }
}
