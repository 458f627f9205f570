//! The environment contract, the same as HAMi-core's, so that either library can be mounted.
//!
//! | variable | meaning |
//! | --- | --- |
//! | `CUDA_DEVICE_MEMORY_LIMIT` | memory limit of every device (`4g`, `2000m`, `512k`, bytes); `0` = none |
//! | `CUDA_DEVICE_MEMORY_LIMIT_<i>` | limit of CUDA device `i`, over the one above |
//! | `CUDA_DEVICE_SM_LIMIT` | share of the device's compute in percent; `0`, `100` or unset = no throttling |
//! | `CUDA_DEVICE_SM_LIMIT_<i>` | share of CUDA device `i`, over the one above (`0` = use the one above) |
//! | `CUDA_DEVICE_MEMORY_SHARED_CACHE` | the file shared by the processes of one claim (default `/tmp/cudevshr.cache`) |
//! | `CUDA_DISABLE_CONTROL` | `true` turns enforcement off (debugging) |
//! | `GPU_CORE_UTILIZATION_POLICY` | `disable` (any case) turns only the compute throttle off |
//!
//! A malformed value is reported and ignored: the library never refuses to start a process.

use std::ffi::OsStr;
use std::path::PathBuf;

use thiserror::Error;

/// Devices addressed by `CUDA_DEVICE_MEMORY_LIMIT_<i>`; HAMi-core has the same bound.
pub const MAX_DEVICES: usize = 16;

pub const ENV_MEMORY_LIMIT: &str = "CUDA_DEVICE_MEMORY_LIMIT";
pub const ENV_SM_LIMIT: &str = "CUDA_DEVICE_SM_LIMIT";
pub const ENV_SHARED_CACHE: &str = "CUDA_DEVICE_MEMORY_SHARED_CACHE";
pub const ENV_DISABLE: &str = "CUDA_DISABLE_CONTROL";
pub const ENV_UTILIZATION_POLICY: &str = "GPU_CORE_UTILIZATION_POLICY";
pub const ENV_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
/// HAMi-core's accounting file when `CUDA_DEVICE_MEMORY_SHARED_CACHE` is unset: /tmp/cudevshr.cache.
pub const DEFAULT_SHARED_CACHE_NAME: &str = "cudevshr.cache";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{var}={value:?}: {reason}; the variable is ignored")]
    Invalid {
        var: String,
        value: String,
        reason: &'static str,
    },
}

fn invalid(var: &str, value: &OsStr, reason: &'static str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_string(),
        value: value.to_string_lossy().into_owned(),
        reason,
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `CUDA_DISABLE_CONTROL=true`: every hook passes its call through.
    pub disabled: bool,
    default_memory: Option<u64>,
    device_memory: [Option<u64>; MAX_DEVICES],
    /// `CUDA_DEVICE_SM_LIMIT`, percent; `None` unset (or 0).
    default_sm: Option<u32>,
    /// `CUDA_DEVICE_SM_LIMIT_<i>`, percent; `None` unset (or 0, which HAMi-core reads as unset).
    device_sm: [Option<u32>; MAX_DEVICES],
    /// `GPU_CORE_UTILIZATION_POLICY=disable`.
    throttle_disabled: bool,
    /// The accounting file: the variable, or HAMi-core's default beside the process's
    /// temporary files.
    pub shared_cache: PathBuf,
    /// `CUDA_VISIBLE_DEVICES` as listed: UUIDs or indices, in CUDA ordinal order.
    pub visible: Vec<String>,
    /// What was malformed; the caller reports it once.
    pub problems: Vec<ConfigError>,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// Reads through `lookup`, so that tests never touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let mut config = Config::default();
        if let Some(value) = lookup(ENV_DISABLE) {
            match parse_bool(&value) {
                Some(disabled) => config.disabled = disabled,
                None => {
                    config
                        .problems
                        .push(invalid(ENV_DISABLE, &value, "expected true or false"))
                }
            }
        }
        if let Some(value) = lookup(ENV_MEMORY_LIMIT) {
            match parse_memory(&value) {
                Ok(limit) => config.default_memory = limit,
                Err(reason) => config
                    .problems
                    .push(invalid(ENV_MEMORY_LIMIT, &value, reason)),
            }
        }
        for (index, slot) in config.device_memory.iter_mut().enumerate() {
            let var = format!("{ENV_MEMORY_LIMIT}_{index}");
            if let Some(value) = lookup(&var) {
                match parse_memory(&value) {
                    Ok(limit) => *slot = limit,
                    Err(reason) => config.problems.push(invalid(&var, &value, reason)),
                }
            }
        }
        if let Some(value) = lookup(ENV_SM_LIMIT) {
            match parse_percent(&value) {
                Ok(limit) => config.default_sm = limit,
                Err(reason) => config.problems.push(invalid(ENV_SM_LIMIT, &value, reason)),
            }
        }
        for (index, slot) in config.device_sm.iter_mut().enumerate() {
            let var = format!("{ENV_SM_LIMIT}_{index}");
            if let Some(value) = lookup(&var) {
                match parse_percent(&value) {
                    Ok(limit) => *slot = limit,
                    Err(reason) => config.problems.push(invalid(&var, &value, reason)),
                }
            }
        }
        if let Some(value) = lookup(ENV_UTILIZATION_POLICY) {
            // HAMi-core compares with "disable"/"DISABLE" and "force"/"FORCE" and takes anything
            // else for the default; any case is accepted here, and anything else is said.
            match value.to_str().map(str::to_ascii_lowercase).as_deref() {
                Some("disable") => config.throttle_disabled = true,
                Some("default" | "force") => {}
                _ => config.problems.push(invalid(
                    ENV_UTILIZATION_POLICY,
                    &value,
                    "expected default, force or disable (any case); the throttle stays on",
                )),
            }
        }
        config.shared_cache = match lookup(ENV_SHARED_CACHE) {
            Some(value) if !value.is_empty() => PathBuf::from(value),
            other => {
                if other.is_some() {
                    config.problems.push(invalid(
                        ENV_SHARED_CACHE,
                        OsStr::new(""),
                        "empty path; the default is used",
                    ));
                }
                // HAMi-core's default, so that the processes of a container share one limit
                // even when nothing names a file; under $TMPDIR when it is set.
                lookup("TMPDIR")
                    .filter(|d| !d.is_empty())
                    .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
                    .join(DEFAULT_SHARED_CACHE_NAME)
            }
        };
        if let Some(value) = lookup(ENV_VISIBLE_DEVICES) {
            config.visible = value
                .to_string_lossy()
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        config
    }

    /// The memory limit of CUDA device `ordinal`, `None` when it has none.
    pub fn memory_limit(&self, ordinal: usize) -> Option<u64> {
        self.device_memory
            .get(ordinal)
            .copied()
            .flatten()
            .or(self.default_memory)
    }

    /// The compute share of CUDA device `ordinal` in percent, `None` when it is not throttled:
    /// its own variable when set and not 0, else `CUDA_DEVICE_SM_LIMIT`; 100 means no throttle.
    pub fn sm_limit(&self, ordinal: usize) -> Option<u32> {
        if self.throttle_disabled {
            return None;
        }
        let percent = self
            .device_sm
            .get(ordinal)
            .copied()
            .flatten()
            .or(self.default_sm)?;
        (percent < 100).then_some(percent)
    }

    /// Whether any device is throttled.
    pub fn throttles(&self) -> bool {
        (0..MAX_DEVICES).any(|d| self.sm_limit(d).is_some())
    }

    /// Whether any device has a memory limit.
    pub fn limits_memory(&self) -> bool {
        self.default_memory.is_some() || self.device_memory.iter().any(Option::is_some)
    }

    /// The CUDA ordinal of the device NVML calls `uuid` (or `index`), by its position in
    /// `CUDA_VISIBLE_DEVICES`; NVML ignores that variable, CUDA does not.
    pub fn ordinal_of(&self, uuid: Option<&str>, index: Option<u32>) -> Option<usize> {
        if self.visible.is_empty() {
            return index.map(|i| i as usize);
        }
        self.visible.iter().position(|entry| {
            uuid.is_some_and(|u| u.eq_ignore_ascii_case(entry))
                || index.is_some_and(|i| entry.parse::<u32>() == Ok(i))
        })
    }
}

/// Go's strconv.ParseBool, which HAMi's tooling uses for the switch.
fn parse_bool(value: &OsStr) -> Option<bool> {
    match value.to_str()? {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// `4g`, `2000m`, `512k` (binary units, either case) or plain bytes; `0` means no limit.
pub fn parse_memory(value: &OsStr) -> Result<Option<u64>, &'static str> {
    let text = value.to_str().ok_or("not UTF-8")?.trim();
    let (digits, scale) = match text.as_bytes().last() {
        Some(b'g' | b'G') => (&text[..text.len() - 1], 1u64 << 30),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 1 << 20),
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1 << 10),
        Some(_) => (text, 1),
        None => return Err("empty value"),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected a number with an optional k, m or g suffix");
    }
    let number: u64 = digits.parse().map_err(|_| "number too large")?;
    let bytes = number.checked_mul(scale).ok_or("number too large")?;
    Ok((bytes > 0).then_some(bytes))
}

/// A percentage; `0` means unset (`None`), as in HAMi-core; `100` (no throttling) is kept so
/// that a device's own 100 overrides a lower default.
pub fn parse_percent(value: &OsStr) -> Result<Option<u32>, &'static str> {
    let text = value.to_str().ok_or("not UTF-8")?.trim();
    let percent: u32 = text
        .parse()
        .map_err(|_| "expected an integer from 0 to 100")?;
    match percent {
        0 => Ok(None),
        1..=100 => Ok(Some(percent)),
        _ => Err("expected an integer from 0 to 100"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let env: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Config::from_lookup(|name| env.get(name).cloned())
    }

    #[test]
    fn memory_values_follow_hami_core() {
        let parse = |s: &str| parse_memory(OsStr::new(s));
        assert_eq!(parse("4g"), Ok(Some(4 << 30)));
        assert_eq!(parse("2000m"), Ok(Some(2000 << 20)));
        assert_eq!(parse("2000M"), Ok(Some(2000 << 20)));
        assert_eq!(parse("512k"), Ok(Some(512 << 10)));
        assert_eq!(parse("1048576"), Ok(Some(1 << 20)));
        assert_eq!(parse("0"), Ok(None));
        assert_eq!(parse("0m"), Ok(None));
        assert!(parse("").is_err());
        assert!(parse("m").is_err());
        assert!(parse("-1g").is_err());
        assert!(parse("1.5g").is_err());
        assert!(parse("4gi").is_err());
        assert!(parse("99999999999999999999").is_err());
        assert!(parse("18446744073709551615g").is_err());
    }

    #[test]
    fn per_device_limits_override_the_default() {
        let c = config(&[
            ("CUDA_DEVICE_MEMORY_LIMIT", "1g"),
            ("CUDA_DEVICE_MEMORY_LIMIT_1", "2048m"),
        ]);
        assert_eq!(c.memory_limit(0), Some(1 << 30));
        assert_eq!(c.memory_limit(1), Some(2 << 30));
        assert_eq!(c.memory_limit(15), Some(1 << 30));
        assert_eq!(c.memory_limit(99), Some(1 << 30));
        assert!(c.problems.is_empty());
        let only_one = config(&[("CUDA_DEVICE_MEMORY_LIMIT_0", "4096m")]);
        assert_eq!(only_one.memory_limit(0), Some(4 << 30));
        assert_eq!(only_one.memory_limit(1), None);
    }

    #[test]
    fn sm_limit_zero_and_hundred_mean_no_throttling() {
        assert_eq!(
            config(&[("CUDA_DEVICE_SM_LIMIT", "30")]).sm_limit(0),
            Some(30)
        );
        assert_eq!(config(&[("CUDA_DEVICE_SM_LIMIT", "100")]).sm_limit(0), None);
        assert_eq!(config(&[("CUDA_DEVICE_SM_LIMIT", "0")]).sm_limit(0), None);
        assert!(!config(&[("CUDA_DEVICE_SM_LIMIT", "0")]).throttles());
        for policy in ["disable", "DISABLE", "Disable"] {
            let disabled = config(&[
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("CUDA_DEVICE_SM_LIMIT_1", "20"),
                ("GPU_CORE_UTILIZATION_POLICY", policy),
            ]);
            assert_eq!(disabled.sm_limit(0), None, "{policy}");
            assert_eq!(disabled.sm_limit(1), None, "{policy}");
            assert!(!disabled.throttles(), "{policy}");
            assert!(disabled.problems.is_empty(), "{policy}");
        }
        for policy in ["FORCE", "force", "Default"] {
            let on = config(&[
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("GPU_CORE_UTILIZATION_POLICY", policy),
            ]);
            assert_eq!(on.sm_limit(0), Some(30), "{policy}");
            assert!(on.problems.is_empty(), "{policy}");
        }
        let unknown = config(&[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("GPU_CORE_UTILIZATION_POLICY", "off"),
        ]);
        assert_eq!(unknown.sm_limit(0), Some(30), "HAMi-core's default: on");
        assert_eq!(unknown.problems.len(), 1, "and said");
    }

    #[test]
    fn per_device_sm_limits_override_the_default_as_in_hami_core() {
        let c = config(&[
            ("CUDA_DEVICE_SM_LIMIT", "30"),
            ("CUDA_DEVICE_SM_LIMIT_1", "60"),
            ("CUDA_DEVICE_SM_LIMIT_2", "0"),
            ("CUDA_DEVICE_SM_LIMIT_3", "100"),
        ]);
        assert_eq!(c.sm_limit(0), Some(30));
        assert_eq!(c.sm_limit(1), Some(60));
        assert_eq!(c.sm_limit(2), Some(30), "0 is unset: the default applies");
        assert_eq!(c.sm_limit(3), None, "100: this device is not throttled");
        assert_eq!(c.sm_limit(99), Some(30));
        let only_one = config(&[("CUDA_DEVICE_SM_LIMIT_1", "25")]);
        assert_eq!(only_one.sm_limit(0), None);
        assert_eq!(only_one.sm_limit(1), Some(25));
        assert!(only_one.throttles());
        let bad = config(&[("CUDA_DEVICE_SM_LIMIT_0", "250")]);
        assert_eq!(bad.sm_limit(0), None);
        assert!(
            bad.problems[0]
                .to_string()
                .starts_with("CUDA_DEVICE_SM_LIMIT_0=\"250\"")
        );
    }

    #[test]
    fn the_accounting_file_defaults_to_hami_cores() {
        assert_eq!(
            config(&[]).shared_cache,
            PathBuf::from("/tmp/cudevshr.cache")
        );
        assert_eq!(
            config(&[("TMPDIR", "/scratch")]).shared_cache,
            PathBuf::from("/scratch/cudevshr.cache")
        );
        let named = config(&[("CUDA_DEVICE_MEMORY_SHARED_CACHE", "/claim/a.cache")]);
        assert_eq!(named.shared_cache, PathBuf::from("/claim/a.cache"));
        let empty = config(&[("CUDA_DEVICE_MEMORY_SHARED_CACHE", "")]);
        assert_eq!(empty.shared_cache, PathBuf::from("/tmp/cudevshr.cache"));
        assert_eq!(empty.problems.len(), 1);
    }

    #[test]
    fn malformed_values_are_reported_with_their_variable_and_ignored() {
        let c = config(&[
            ("CUDA_DEVICE_MEMORY_LIMIT_0", "lots"),
            ("CUDA_DEVICE_SM_LIMIT", "150"),
            ("CUDA_DISABLE_CONTROL", "maybe"),
        ]);
        assert_eq!(c.memory_limit(0), None);
        assert_eq!(c.sm_limit(0), None);
        assert!(!c.disabled);
        let text: Vec<String> = c.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("CUDA_DISABLE_CONTROL=\"maybe\""),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("CUDA_DEVICE_MEMORY_LIMIT_0=\"lots\""),
            "{text:?}"
        );
        assert!(
            text[2].starts_with("CUDA_DEVICE_SM_LIMIT=\"150\""),
            "{text:?}"
        );
    }

    #[test]
    fn the_switch_parses_like_go() {
        assert!(config(&[("CUDA_DISABLE_CONTROL", "true")]).disabled);
        assert!(config(&[("CUDA_DISABLE_CONTROL", "1")]).disabled);
        assert!(!config(&[("CUDA_DISABLE_CONTROL", "false")]).disabled);
    }

    #[test]
    fn nvml_devices_map_to_cuda_ordinals_through_visible_devices() {
        let c = config(&[("CUDA_VISIBLE_DEVICES", "GPU-b,GPU-a")]);
        assert_eq!(c.ordinal_of(Some("GPU-a"), Some(0)), Some(1));
        assert_eq!(c.ordinal_of(Some("gpu-B"), Some(1)), Some(0));
        assert_eq!(c.ordinal_of(Some("GPU-c"), Some(2)), None);
        let by_index = config(&[("CUDA_VISIBLE_DEVICES", "3,1")]);
        assert_eq!(by_index.ordinal_of(Some("GPU-x"), Some(1)), Some(1));
        assert_eq!(config(&[]).ordinal_of(None, Some(2)), Some(2));
    }

    proptest::proptest! {
        #[test]
        fn no_value_makes_the_parsers_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..24)) {
            use std::os::unix::ffi::OsStrExt;
            let value = OsStr::from_bytes(&bytes);
            let _ = parse_memory(value);
            let _ = parse_percent(value);
            let _ = parse_bool(value);
        }

        #[test]
        fn suffixes_scale_exactly(n in 1u64..(1 << 33)) {
            let g = parse_memory(OsStr::new(&format!("{n}g"))).unwrap();
            proptest::prop_assert_eq!(g, n.checked_mul(1 << 30));
            let m = parse_memory(OsStr::new(&format!("{n}M"))).unwrap();
            proptest::prop_assert_eq!(m, Some(n << 20));
        }
    }
}
