//! CPU lists (`1`, `0,2`, `2-5`) and pinning the calling thread, so that the generator and the
//! system under test never share a core and the measurement is per core.

use anyhow::{bail, Context as _};

/// Parses a CPU list as `taskset -c` takes it.
pub fn parse_cpus(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let first: usize = first.parse().with_context(|| format!("CPU {first:?}"))?;
                let last: usize = last.parse().with_context(|| format!("CPU {last:?}"))?;
                if last < first {
                    bail!("CPU range {part:?} runs backwards");
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().with_context(|| format!("CPU {part:?}"))?),
        }
    }
    if cpus.is_empty() {
        bail!("the CPU list {list:?} is empty");
    }
    Ok(cpus)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        bail!("CPU {cpu} is beyond the largest CPU set");
    }
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).with_context(|| format!("pin to CPU {cpu}"))
}

/// The CPU for thread `k`, cycling through `cpus`.
pub fn cpu_for(cpus: &[usize], k: usize) -> Option<usize> {
    cpus.get(k.checked_rem(cpus.len())?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(parse_cpus("1").unwrap(), [1]);
        assert_eq!(parse_cpus("0,2").unwrap(), [0, 2]);
        assert_eq!(parse_cpus("2-4,7").unwrap(), [2, 3, 4, 7]);
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert_eq!(cpu_for(&[4, 5], 3), Some(5));
        assert_eq!(cpu_for(&[], 3), None);
    }
}
