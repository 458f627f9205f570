//! What a scenario measures: per-pod latencies and the CPU time of the control plane.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Created → bound of every pod that was bound, sorted.
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    /// Pods in `bound` that are also in `created`; a pod never bound is not counted (the
    /// report shows bound/created).
    pub fn of(created: &HashMap<String, Instant>, bound: &HashMap<String, Instant>) -> Latencies {
        let mut sorted: Vec<Duration> = created
            .iter()
            .filter_map(|(pod, at)| Some(bound.get(pod)?.saturating_duration_since(*at)))
            .collect();
        sorted.sort();
        Latencies { sorted }
    }

    pub fn count(&self) -> usize {
        self.sorted.len()
    }

    /// The nearest-rank quantile `q` (0 < q ≤ 1); zero when nothing was bound.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }
}

/// User plus system CPU seconds of named processes (and of this bench) at one moment.
pub struct CpuSample {
    seconds: Vec<(String, Option<f64>)>,
}

impl CpuSample {
    pub fn take(processes: &[(String, Option<i32>)]) -> CpuSample {
        let mut seconds: Vec<(String, Option<f64>)> = processes
            .iter()
            .map(|(name, pid)| (name.clone(), pid.and_then(|p| cpu_seconds(&p.to_string()))))
            .collect();
        seconds.push(("bench".into(), cpu_seconds("self")));
        CpuSample { seconds }
    }

    /// CPU seconds used since `before`, per process; None for one that was not running at
    /// both samples.
    pub fn since(&self, before: &CpuSample) -> Vec<(String, Option<f64>)> {
        self.seconds
            .iter()
            .zip(&before.seconds)
            .map(|((name, now), (_, then))| (name.clone(), now.zip(*then).map(|(n, t)| n - t)))
            .collect()
    }
}

/// utime + stime of /proc/`pid`/stat, in seconds (Linux counts them in 1/100 s: USER_HZ).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and ends with ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The kube-scheduler's `scheduler_schedule_attempts_total`, by result (scheduled,
/// unschedulable, error), read from its own metrics endpoint.
pub async fn scheduler_attempts(
    scheduler: &kube::Client,
) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = scheduler.request_text(request).await?;
    Ok(attempts_by_result(&text))
}

fn attempts_by_result(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut by_result = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("scheduler_schedule_attempts_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let result = labels
            .split(',')
            .find_map(|l| l.strip_prefix("result=\""))
            .map(|r| r.trim_end_matches('"').to_string());
        if let (Some(result), Ok(value)) = (result, value.trim().parse::<f64>()) {
            *by_result.entry(result).or_insert(0.0) += value;
        }
    }
    by_result
}
