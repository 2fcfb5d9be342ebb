//! The memory budget for converted weights (`--memory-budget`): a size the
//! user gives, or a safe share of the memory free to this process.

use std::str::FromStr;

/// What `--memory-budget` takes: a size (`64MB`, `1.5GiB`, `4096`) or `none`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBudget {
    Bytes(usize),
    /// Keep every converted tensor (the engine's behaviour before budgets).
    Unlimited,
}

impl FromStr for MemoryBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("none") {
            return Ok(MemoryBudget::Unlimited);
        }
        let size: bytesize::ByteSize = text.parse().map_err(|_| {
            format!("`{text}` is not a size: give bytes with a unit (64MB, 1.5GiB) or `none`")
        })?;
        let bytes = usize::try_from(size.as_u64())
            .map_err(|_| format!("`{text}` is larger than this machine can address"))?;
        if bytes == 0 {
            return Err("a memory budget of 0 bytes holds no weight: give a size or `none`".into());
        }
        Ok(MemoryBudget::Bytes(bytes))
    }
}

impl std::fmt::Display for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryBudget::Bytes(bytes) => write!(f, "{bytes}B"),
            MemoryBudget::Unlimited => f.write_str("none"),
        }
    }
}

/// The budget in bytes (`None`: no limit): the user's, else a quarter of
/// the memory available now — to this process's cgroup when it has a limit
/// (Slurm, Kubernetes), else to the machine. The rest is left to
/// activations, ONNX Runtime's buffers, the mapped file's pages and the
/// machine's other work. A quarter keeps one 70B-sized block (3.4 GB of
/// f32) and the pass around it under 8 GB on a 24 GB machine.
pub fn resolve(budget: Option<MemoryBudget>) -> Option<usize> {
    match budget {
        Some(MemoryBudget::Bytes(bytes)) => Some(bytes),
        Some(MemoryBudget::Unlimited) => None,
        None => default_budget(),
    }
}

fn default_budget() -> Option<usize> {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let mut available = system.available_memory();
    if let Some(limits) = system.cgroup_limits() {
        available = available.min(limits.free_memory);
    }
    // A platform where sysinfo cannot tell: no limit rather than none at all.
    (available > 0).then(|| usize::try_from(available / 4).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!("64MB".parse(), Ok(MemoryBudget::Bytes(64_000_000)));
        assert_eq!("64MiB".parse(), Ok(MemoryBudget::Bytes(64 << 20)));
        assert_eq!("4096".parse(), Ok(MemoryBudget::Bytes(4096)));
        assert_eq!("none".parse(), Ok(MemoryBudget::Unlimited));
        let error = "lots".parse::<MemoryBudget>().unwrap_err();
        assert!(error.contains("`lots` is not a size"), "{error}");
        assert!("0".parse::<MemoryBudget>().is_err());
        // What the isolated child is given reads back as the same budget.
        let budget = MemoryBudget::Bytes(12_345);
        assert_eq!(budget.to_string().parse(), Ok(budget));
    }

    #[test]
    fn the_default_is_a_share_of_what_is_free() {
        let budget = resolve(None).expect("Linux reports its free memory");
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        assert!(budget as u64 <= system.available_memory() / 4 + (64 << 20));
        assert!(budget > 0);
    }
}
