//! XP levels and badges, computed from a key's stats (never stored, so the rules can evolve).

/// 1 + floor(sqrt(xp / 100)).
pub fn level_for(xp: i64) -> i64 {
    let xp = xp.max(0) as u64;
    // floor(sqrt(xp / 100)) == floor(isqrt(xp) / 10), without floating point.
    1 + (xp.isqrt() / 10) as i64
}

pub fn badges_for(calls: i64, spent_mcents: i64) -> Vec<&'static str> {
    let mut out = Vec::new();
    if calls >= 1 {
        out.push("first_call");
    }
    if calls >= 100 {
        out.push("regular");
    }
    if calls >= 1000 {
        out.push("power_user");
    }
    if spent_mcents >= 1_000_000 {
        out.push("big_spender");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level_for(0), 1);
        assert_eq!(level_for(99), 1);
        assert_eq!(level_for(100), 2);
        assert_eq!(level_for(399), 2);
        assert_eq!(level_for(400), 3);
        assert_eq!(level_for(10_000), 11);
        assert_eq!(level_for(-5), 1);
    }

    #[test]
    fn badges() {
        assert!(badges_for(0, 0).is_empty());
        assert_eq!(badges_for(1, 0), ["first_call"]);
        assert_eq!(badges_for(1000, 1_000_000), ["first_call", "regular", "power_user", "big_spender"]);
    }
}
