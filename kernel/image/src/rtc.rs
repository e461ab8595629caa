//! The CMOS real-time clock's registers, decoded into a calendar date and Unix
//! time (needed to check certificate validity).
//!
//! The binary (`src/cmos.rs`) reads the registers through ports
//! 0x70/0x71: it waits for the update-in-progress flag to clear and reads them
//! until two reads agree, then hands them to [`RtcRegisters::decode`].
//!
//! The registers hold the date either in BCD or in binary and the hour in 12- or
//! 24-hour form, as status register B says (bit 2: binary, bit 1: 24-hour); in
//! 12-hour form bit 7 of the hour means PM. The century comes from the ACPI
//! century register (CMOS 0x32 on PCs and QEMU) when it holds 19 or 20 (in the
//! same encoding); otherwise the year is taken to be 20yy. The clock is read as
//! UTC (QEMU's default, `-rtc base=utc`, follows the host's clock in UTC).

use core::fmt;

/// Status register B bit: the date and time registers are binary, not BCD.
pub const STATUS_B_BINARY: u8 = 1 << 2;
/// Status register B bit: the hour register is 24-hour, not 12-hour.
pub const STATUS_B_24_HOUR: u8 = 1 << 1;
/// In 12-hour mode, bit 7 of the hour register marks PM.
const HOUR_PM: u8 = 0x80;

/// The raw RTC registers, as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RtcRegisters {
    /// Register 0x00.
    pub seconds: u8,
    /// Register 0x02.
    pub minutes: u8,
    /// Register 0x04 (bit 7 is PM in 12-hour mode).
    pub hours: u8,
    /// Register 0x07: day of the month.
    pub day: u8,
    /// Register 0x08.
    pub month: u8,
    /// Register 0x09: year within the century.
    pub year: u8,
    /// Register 0x32: the century (ACPI FADT `century`), if the machine has one.
    pub century: u8,
    /// Status register B (0x0B): the encoding of the others.
    pub status_b: u8,
}

/// A UTC date and time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTime {
    /// Full year, e.g. 2025.
    pub year: u16,
    /// 1-12.
    pub month: u8,
    /// 1-31.
    pub day: u8,
    /// 0-23.
    pub hour: u8,
    /// 0-59.
    pub minute: u8,
    /// 0-59 (60 is accepted for a leap second and counts as 59 + 1).
    pub second: u8,
}

/// Why the clock could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtcError {
    /// A register held a value out of range (or not valid BCD): `(field, raw)`.
    Invalid(&'static str, u8),
    /// The update-in-progress flag never cleared.
    UpdateStuck,
    /// Successive reads kept differing.
    Unstable,
}

impl fmt::Display for RtcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtcError::Invalid(field, raw) => {
                write!(f, "register `{field}` holds an invalid value {raw:#04x}")
            }
            RtcError::UpdateStuck => f.write_str("the update-in-progress flag never cleared"),
            RtcError::Unstable => f.write_str("successive reads kept differing"),
        }
    }
}

/// `value` decoded from BCD, or `None` if a nibble is above 9.
pub fn from_bcd(value: u8) -> Option<u8> {
    let (hi, lo) = (value >> 4, value & 0x0F);
    (hi <= 9 && lo <= 9).then_some(hi * 10 + lo)
}

impl RtcRegisters {
    /// The date and time the registers hold.
    pub fn decode(&self) -> Result<DateTime, RtcError> {
        let binary = self.status_b & STATUS_B_BINARY != 0;
        let field = |name: &'static str, raw: u8, lo: u8, hi: u8| {
            let v = if binary { Some(raw) } else { from_bcd(raw) };
            v.filter(|v| (lo..=hi).contains(v))
                .ok_or(RtcError::Invalid(name, raw))
        };
        let hour = if self.status_b & STATUS_B_24_HOUR != 0 {
            field("hours", self.hours, 0, 23)?
        } else {
            // 12 AM is midnight (0), 12 PM is noon (12).
            let h = field("hours", self.hours & !HOUR_PM, 1, 12)? % 12;
            if self.hours & HOUR_PM != 0 {
                h + 12
            } else {
                h
            }
        };
        let century = match field("century", self.century, 19, 20) {
            Ok(c) => u16::from(c),
            Err(_) => 20,
        };
        let year = century * 100 + u16::from(field("year", self.year, 0, 99)?);
        let month = field("month", self.month, 1, 12)?;
        let day = field("day", self.day, 1, days_in_month(year, month))?;
        Ok(DateTime {
            year,
            month,
            day,
            hour,
            minute: field("minutes", self.minutes, 0, 59)?,
            second: field("seconds", self.seconds, 0, 60)?,
        })
    }
}

/// Whether `year` is a leap year in the Gregorian calendar.
pub fn is_leap_year(year: u16) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

/// Days in `month` (1-12) of `year`.
pub fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        2 if is_leap_year(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given date of the proleptic Gregorian calendar
/// (negative before 1970). Howard Hinnant's `days_from_civil`: the year is
/// shifted to start in March, so the leap day is the last day of the year.
pub fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The date of the proleptic Gregorian calendar `days` after 1970-01-01
/// (negative before): `(year, month, day)`. The inverse of
/// [`days_from_civil`] (Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl DateTime {
    /// The UTC date and time of `secs` seconds since 1970-01-01 00:00:00
    /// UTC (years outside 0-65535 saturate: certificates say 9999 at most).
    pub fn from_unix(secs: i64) -> DateTime {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let rem = secs.rem_euclid(86_400);
        DateTime {
            year: year.clamp(0, i64::from(u16::MAX)) as u16,
            month,
            day,
            hour: (rem / 3_600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// Seconds since 1970-01-01 00:00:00 UTC.
    pub fn unix_seconds(&self) -> i64 {
        let days = days_from_civil(i64::from(self.year), self.month, self.day);
        days * 86_400
            + i64::from(self.hour) * 3_600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

impl fmt::Display for DateTime {
    /// ISO 8601: `2025-11-21T10:53:07Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(year: u16, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        }
    }

    #[test]
    fn unix_time_of_known_dates() {
        assert_eq!(dt(1970, 1, 1, 0, 0, 0).unix_seconds(), 0);
        assert_eq!(dt(2000, 1, 1, 0, 0, 0).unix_seconds(), 946_684_800);
        // Leap day of a year divisible by 400, and the day after.
        assert_eq!(dt(2000, 2, 29, 0, 0, 0).unix_seconds(), 951_782_400);
        assert_eq!(dt(2000, 3, 1, 0, 0, 0).unix_seconds(), 951_868_800);
        // The 32-bit rollover: 2038-01-19T03:14:07Z.
        assert_eq!(
            dt(2038, 1, 19, 3, 14, 7).unix_seconds(),
            i64::from(i32::MAX)
        );
        // A leap year (2024) and the end of a common year (2023).
        assert_eq!(dt(2024, 2, 29, 12, 0, 0).unix_seconds(), 1_709_208_000);
        assert_eq!(dt(2023, 12, 31, 23, 59, 59).unix_seconds(), 1_704_067_199);
        assert_eq!(dt(2025, 11, 21, 10, 53, 7).unix_seconds(), 1_763_722_387);
        // 2100 is not a leap year: 2100-03-01 is one day after 2100-02-28.
        assert_eq!(
            dt(2100, 3, 1, 0, 0, 0).unix_seconds() - dt(2100, 2, 28, 0, 0, 0).unix_seconds(),
            86_400
        );
        assert_eq!(dt(2100, 3, 1, 0, 0, 0).unix_seconds(), 4_107_542_400);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn from_unix_inverts_unix_seconds() {
        for t in [
            dt(1970, 1, 1, 0, 0, 0),
            dt(2000, 2, 29, 23, 59, 59),
            dt(2024, 12, 31, 12, 0, 1),
            dt(2025, 11, 21, 10, 53, 7),
            dt(2100, 3, 1, 0, 0, 0),
            dt(9999, 12, 31, 23, 59, 59),
        ] {
            assert_eq!(DateTime::from_unix(t.unix_seconds()), t);
        }
        assert_eq!(
            DateTime::from_unix(1_763_722_387).to_string(),
            "2025-11-21T10:53:07Z"
        );
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn leap_years() {
        assert!(is_leap_year(2000));
        assert!(is_leap_year(2024));
        assert!(!is_leap_year(1900));
        assert!(!is_leap_year(2100));
        assert!(!is_leap_year(2023));
        assert_eq!(days_in_month(2024, 2), 29);
        assert_eq!(days_in_month(2023, 2), 28);
        assert_eq!(days_in_month(2023, 4), 30);
        assert_eq!(days_in_month(2023, 12), 31);
    }

    #[test]
    fn bcd() {
        assert_eq!(from_bcd(0x59), Some(59));
        assert_eq!(from_bcd(0x00), Some(0));
        assert_eq!(from_bcd(0x99), Some(99));
        assert_eq!(from_bcd(0x5A), None);
        assert_eq!(from_bcd(0xA0), None);
    }

    /// 2024-02-29 23:59:58 as QEMU/SeaBIOS leave the RTC: BCD, 24-hour.
    fn qemu_regs() -> RtcRegisters {
        RtcRegisters {
            seconds: 0x58,
            minutes: 0x59,
            hours: 0x23,
            day: 0x29,
            month: 0x02,
            year: 0x24,
            century: 0x20,
            status_b: STATUS_B_24_HOUR,
        }
    }

    #[test]
    fn decode_bcd_24_hour() {
        let t = qemu_regs().decode().unwrap();
        assert_eq!(t, dt(2024, 2, 29, 23, 59, 58));
        assert_eq!(t.to_string(), "2024-02-29T23:59:58Z");
        assert_eq!(t.unix_seconds(), 1_709_251_198);
    }

    #[test]
    fn decode_binary_and_12_hour() {
        let binary = RtcRegisters {
            seconds: 7,
            minutes: 53,
            hours: 10,
            day: 21,
            month: 11,
            year: 25,
            century: 20,
            status_b: STATUS_B_BINARY | STATUS_B_24_HOUR,
        };
        assert_eq!(binary.decode(), Ok(dt(2025, 11, 21, 10, 53, 7)));
        // 12-hour BCD: 12 AM is 00, 12 PM is 12, 11 PM is 23.
        let h12 = |hours| {
            RtcRegisters {
                hours,
                status_b: 0,
                ..qemu_regs()
            }
            .decode()
            .map(|t| t.hour)
        };
        assert_eq!(h12(0x12), Ok(0));
        assert_eq!(h12(0x01), Ok(1));
        assert_eq!(h12(0x80 | 0x12), Ok(12));
        assert_eq!(h12(0x80 | 0x11), Ok(23));
        assert_eq!(h12(0x00), Err(RtcError::Invalid("hours", 0x00)));
        assert_eq!(h12(0x13), Err(RtcError::Invalid("hours", 0x13)));
        // 12-hour binary: PM is still bit 7.
        let pm_binary = RtcRegisters {
            hours: 0x80 | 5,
            status_b: STATUS_B_BINARY,
            ..binary
        };
        assert_eq!(pm_binary.decode().map(|t| t.hour), Ok(17));
    }

    #[test]
    fn century() {
        let with = |century| {
            RtcRegisters {
                century,
                ..qemu_regs()
            }
            .decode()
            .map(|t| t.year)
        };
        assert_eq!(with(0x20), Ok(2024));
        assert_eq!(with(0x19), Ok(1924));
        // No century register (reads 0 or 0xff): 20yy.
        assert_eq!(with(0x00), Ok(2024));
        assert_eq!(with(0xFF), Ok(2024));
    }

    #[test]
    fn invalid_registers() {
        let bad = |f: fn(&mut RtcRegisters)| {
            let mut r = qemu_regs();
            f(&mut r);
            r.decode()
        };
        assert_eq!(
            bad(|r| r.month = 0x13),
            Err(RtcError::Invalid("month", 0x13))
        );
        assert_eq!(bad(|r| r.month = 0), Err(RtcError::Invalid("month", 0)));
        assert_eq!(
            bad(|r| r.minutes = 0x5A),
            Err(RtcError::Invalid("minutes", 0x5A))
        );
        // 2023 is not a leap year: no 29 February.
        assert_eq!(bad(|r| r.year = 0x23), Err(RtcError::Invalid("day", 0x29)));
        assert_eq!(bad(|r| r.day = 0x00), Err(RtcError::Invalid("day", 0)));
        assert!(RtcError::Invalid("day", 0x29)
            .to_string()
            .contains("`day` holds an invalid value 0x29"));
    }
}
