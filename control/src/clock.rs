//! The one place the control plane reads the wall clock. Everything below it —
//! token, certificate and grant checks, the registry — takes `now` as an
//! argument, so expiry is tested without waiting.

use metta_trust::UnixTime;

/// Seconds since the Unix epoch.
pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
