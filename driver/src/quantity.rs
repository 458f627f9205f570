//! Kubernetes resource quantities (`resource.Quantity`), parsed exactly.
//!
//! Capacities, memory requests and CEL `quantity()` comparisons all go through this one parser so
//! that a value means the same thing to the allocator, the plugin and the user's selectors.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Nano-units per unit: quantities are held as an integer count of 10^-9, the finest precision
/// Kubernetes keeps.
const NANOS: i128 = 1_000_000_000;

/// A parsed quantity, exact to 10^-9 (values with finer precision round up, as the API server does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Quantity {
    nanos: i128,
}

/// Why a string is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("quantity {0:?} is empty")]
    Empty(String),
    #[error("quantity {0:?} is not a number with an optional suffix (e.g. 4Gi, 500M, 1.5, 2e3)")]
    Syntax(String),
    #[error(
        "quantity {0:?} has unknown suffix {1:?} (use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P, E, m, u, n or an exponent)"
    )]
    Suffix(String, String),
    #[error("quantity {0:?} is too large")]
    Overflow(String),
}

impl Quantity {
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// A whole number of units (bytes for memory, percent for cores).
    pub const fn from_units(units: i64) -> Self {
        Quantity {
            nanos: units as i128 * NANOS,
        }
    }

    /// The value rounded up to a whole unit (Kubernetes rounds capacities up).
    pub fn ceil_units(&self) -> i128 {
        let q = self.nanos.div_euclid(NANOS);
        if self.nanos.rem_euclid(NANOS) == 0 {
            q
        } else {
            q + 1
        }
    }

    /// The value as whole non-negative bytes, if it fits in a u64.
    pub fn to_bytes(&self) -> Option<u64> {
        u64::try_from(self.ceil_units()).ok()
    }

    pub fn is_negative(&self) -> bool {
        self.nanos < 0
    }

    pub fn nanos(&self) -> i128 {
        self.nanos
    }

    /// CEL's `compareTo`: -1, 0 or 1.
    pub fn compare_to(&self, other: &Quantity) -> i64 {
        match self.cmp(other) {
            Ordering::Less => -1,
            Ordering::Equal => 0,
            Ordering::Greater => 1,
        }
    }

    pub fn checked_add(&self, other: &Quantity) -> Option<Quantity> {
        self.nanos
            .checked_add(other.nanos)
            .map(|nanos| Quantity { nanos })
    }

    pub fn checked_sub(&self, other: &Quantity) -> Option<Quantity> {
        self.nanos
            .checked_sub(other.nanos)
            .map(|nanos| Quantity { nanos })
    }

    /// Parse a Kubernetes quantity: `<signed decimal><suffix>` where the suffix is a binary SI
    /// suffix (Ki…Ei), a decimal SI suffix (n, u, m, "", k, M, G, T, P, E) or an exponent (e3, E-2).
    pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
        let original = s;
        let s = s.trim();
        if s.is_empty() {
            return Err(QuantityError::Empty(original.to_string()));
        }
        let syntax = || QuantityError::Syntax(original.to_string());
        let overflow = || QuantityError::Overflow(original.to_string());

        let (negative, rest) = match s.as_bytes()[0] {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(num_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(syntax());
        }
        let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));

        // Mantissa as an integer with `frac_len` implied decimal places.
        let mut mantissa: i128 = 0;
        for c in int_part.bytes().chain(frac_part.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(i128::from(c - b'0')))
                .ok_or_else(overflow)?;
        }
        let frac_len = frac_part.len() as i32;

        // (multiplier, power of ten) from the suffix.
        let (binary_mul, dec_exp): (i128, i32) = match suffix {
            "" => (1, 0),
            "Ki" => (1 << 10, 0),
            "Mi" => (1 << 20, 0),
            "Gi" => (1 << 30, 0),
            "Ti" => (1 << 40, 0),
            "Pi" => (1 << 50, 0),
            "Ei" => (1 << 60, 0),
            "n" => (1, -9),
            "u" => (1, -6),
            "m" => (1, -3),
            "k" => (1, 3),
            "M" => (1, 6),
            "G" => (1, 9),
            "T" => (1, 12),
            "P" => (1, 15),
            "E" => (1, 18),
            other => {
                let exp = other
                    .strip_prefix('e')
                    .or_else(|| other.strip_prefix('E'))
                    .ok_or_else(|| {
                        QuantityError::Suffix(original.to_string(), other.to_string())
                    })?;
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                let valid = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
                if !valid {
                    return Err(QuantityError::Suffix(
                        original.to_string(),
                        other.to_string(),
                    ));
                }
                let e: i32 = exp.parse().map_err(|_| overflow())?;
                (1, e)
            }
        };

        // value = mantissa * binary_mul * 10^(dec_exp - frac_len); nanos = value * 10^9.
        let mut nanos = mantissa.checked_mul(binary_mul).ok_or_else(overflow)?;
        let exp10 = dec_exp - frac_len + 9;
        if exp10 >= 0 {
            if exp10 > 38 {
                return if nanos == 0 {
                    Ok(Quantity::ZERO)
                } else {
                    Err(overflow())
                };
            }
            nanos = nanos
                .checked_mul(10i128.pow(exp10 as u32))
                .ok_or_else(overflow)?;
        } else {
            let div_exp = -exp10;
            if div_exp > 38 {
                nanos = i128::from(nanos != 0);
            } else {
                let div = 10i128.pow(div_exp as u32);
                // Round up (away from zero for positives) as the API server does on precision loss.
                nanos = nanos / div + i128::from(nanos % div != 0);
            }
        }
        if negative {
            nanos = -nanos;
        }
        Ok(Quantity { nanos })
    }
}

impl FromStr for Quantity {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Quantity::parse(s)
    }
}

impl fmt::Display for Quantity {
    /// A canonical form the API server accepts unchanged: whole binary multiples use Ki…Ei,
    /// other integers are plain, fractions use the milli or nano suffix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nanos % NANOS == 0 {
            let units = self.nanos / NANOS;
            if units != 0 {
                for (suffix, shift) in [
                    ("Ei", 60),
                    ("Pi", 50),
                    ("Ti", 40),
                    ("Gi", 30),
                    ("Mi", 20),
                    ("Ki", 10),
                ] {
                    let mul = 1i128 << shift;
                    if units % mul == 0 {
                        return write!(f, "{}{}", units / mul, suffix);
                    }
                }
            }
            write!(f, "{units}")
        } else if self.nanos % 1_000_000 == 0 {
            write!(f, "{}m", self.nanos / 1_000_000)
        } else {
            write!(f, "{}n", self.nanos)
        }
    }
}

impl From<&Quantity> for k8s_openapi::apimachinery::pkg::api::resource::Quantity {
    fn from(q: &Quantity) -> Self {
        k8s_openapi::apimachinery::pkg::api::resource::Quantity(q.to_string())
    }
}

impl TryFrom<&k8s_openapi::apimachinery::pkg::api::resource::Quantity> for Quantity {
    type Error = QuantityError;
    fn try_from(
        q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity,
    ) -> Result<Self, Self::Error> {
        Quantity::parse(&q.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(q("4Gi").to_bytes(), Some(4 << 30));
        assert_eq!(q("2000Mi").to_bytes(), Some(2000 << 20));
        assert_eq!(q("80G").to_bytes(), Some(80_000_000_000));
        assert_eq!(q("1k").to_bytes(), Some(1000));
        assert_eq!(q("1.5Gi").to_bytes(), Some(3 << 29));
        assert_eq!(q("100").to_bytes(), Some(100));
        assert_eq!(q("2e3").to_bytes(), Some(2000));
        assert_eq!(q("2E3").to_bytes(), Some(2000));
        assert_eq!(q("1e-3"), q("1m"));
        assert_eq!(q("500m").ceil_units(), 1);
        assert_eq!(q("+7").ceil_units(), 7);
        assert!(q("-1").is_negative());
        assert_eq!(q(".5").nanos(), 500_000_000);
        assert_eq!(q("1n").nanos(), 1);
        assert_eq!(q("3u").nanos(), 3_000);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", " ", "Gi", "1.2.3", "4GB", "4gi", "1e", "1e+", "--1", "1 Gi", ".", "1e3.5", "0x10",
        ] {
            assert!(Quantity::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(matches!(
            Quantity::parse("1e40"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            Quantity::parse("4XB"),
            Err(QuantityError::Suffix(_, _))
        ));
    }

    #[test]
    fn precision_loss_rounds_up() {
        assert_eq!(q("1e-10").nanos(), 1);
        assert_eq!(q("0.0000000001").nanos(), 1);
        assert_eq!(q("0e-50").nanos(), 0);
    }

    #[test]
    fn formats_canonically() {
        assert_eq!(q("4096Mi").to_string(), "4Gi");
        assert_eq!(q("81559Mi").to_string(), "81559Mi");
        assert_eq!(q("100").to_string(), "100");
        assert_eq!(q("0").to_string(), "0");
        assert_eq!(q("1.5").to_string(), "1500m");
        assert_eq!(q("1.0000000015").to_string(), "1000000002n");
    }

    #[test]
    fn compares_like_cel() {
        assert_eq!(q("1Gi").compare_to(&q("1G")), 1);
        assert_eq!(q("1000M").compare_to(&q("1G")), 0);
        assert_eq!(q("1").compare_to(&q("2")), -1);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = Quantity::parse(&s);
        }

        #[test]
        fn display_round_trips(n in -(1i64 << 62)..(1i64 << 62), milli in 0u32..1000) {
            let v = Quantity { nanos: i128::from(n) * NANOS + i128::from(milli) * 1_000_000 };
            prop_assert_eq!(Quantity::parse(&v.to_string()).unwrap(), v);
        }

        #[test]
        fn binary_suffixes_scale(n in 0u64..(1 << 20)) {
            prop_assert_eq!(q(&format!("{n}Mi")).to_bytes(), Some(n << 20));
            prop_assert_eq!(q(&format!("{n}Ki")).to_bytes(), Some(n << 10));
        }
    }
}
