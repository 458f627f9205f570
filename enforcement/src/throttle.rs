//! The compute cap: a token bucket in front of kernel launches, refilled every tick at a rate a
//! feedback loop sets from the utilization the claim was measured to have.
//!
//! A launch costs its number of blocks. Kernel durations are unknown at launch, so the rate is
//! learned: if `consumed` tokens in the last tick kept the GPU `util` % busy, then
//! `consumed × target / util` tokens would have kept it `target` % busy. The estimate is
//! smoothed, since NVML's samples lag the launches. Every process of a claim measures the
//! claim's utilization as a whole, so with several processes each one's rate scales by the same
//! `target / util` and their sum converges on the target too.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// How often the bucket is refilled and the rate revised.
pub const TICK: Duration = Duration::from_millis(100);
/// Before the first measurement: a tick's worth of launches is let through unthrottled.
const INITIAL_RATE: f64 = 1.0e9;
const MIN_RATE: f64 = 1.0;
const MAX_RATE: f64 = 1.0e12;

#[derive(Debug, Default)]
pub struct Bucket {
    tokens: AtomicI64,
    consumed: AtomicU64,
    starved: AtomicBool,
}

impl Bucket {
    pub fn new() -> Self {
        let bucket = Bucket::default();
        bucket.tokens.store(INITIAL_RATE as i64, Ordering::Relaxed);
        bucket
    }

    /// Takes `cost` tokens if there are any left; one launch may overdraw the bucket, so a
    /// kernel larger than a tick's budget still runs (and the next ticks pay for it).
    pub fn try_take(&self, cost: u64) -> bool {
        if self.tokens.load(Ordering::Acquire) <= 0 {
            self.starved.store(true, Ordering::Relaxed);
            return false;
        }
        let cost = cost.min(i64::MAX as u64) as i64;
        self.tokens.fetch_sub(cost, Ordering::AcqRel);
        self.consumed.fetch_add(cost as u64, Ordering::Relaxed);
        true
    }

    /// Ends a tick: what was consumed and whether a launch had to wait.
    pub fn end_tick(&self) -> (u64, bool) {
        let consumed = self.consumed.swap(0, Ordering::AcqRel);
        let starved = self.starved.swap(false, Ordering::AcqRel);
        (consumed, starved)
    }

    /// Adds `rate` tokens, keeping at most one tick's worth: an idle process cannot save up a
    /// burst.
    pub fn refill(&self, rate: f64) {
        let rate = rate as i64;
        let _ = self
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(rate).min(rate))
            });
    }

    pub fn tokens(&self) -> i64 {
        self.tokens.load(Ordering::Acquire)
    }
}

/// The feedback loop of one device.
#[derive(Debug, Clone)]
pub struct Controller {
    target: f64,
    rate: f64,
}

impl Controller {
    pub fn new(target_percent: u32) -> Self {
        Controller {
            target: f64::from(target_percent.clamp(1, 100)),
            rate: INITIAL_RATE,
        }
    }

    /// Revises the rate after a tick in which `consumed` tokens were spent and the claim's
    /// processes were measured `util` % busy (`None`: no new measurement).
    pub fn update(&mut self, consumed: u64, util: Option<f64>, starved: bool) -> f64 {
        let rate = match util {
            None => self.rate,
            Some(util) if consumed == 0 => {
                // Nothing launched this tick. Still busy (a backlog queued earlier) means the
                // rate is too high; idle and starved means it is too low.
                if util > self.target {
                    self.rate * (self.target / util)
                } else if starved {
                    self.rate * 2.0
                } else {
                    self.rate
                }
            }
            Some(util) if util < 0.5 => self.rate * 2.0,
            Some(util) => {
                let estimate = consumed as f64 * self.target / util;
                if starved {
                    // The rate was binding: move half-way, as the measurement lags.
                    0.5 * self.rate + 0.5 * estimate
                } else {
                    // The rate did not bind, so it says nothing; the estimate does.
                    estimate
                }
            }
        };
        self.rate = rate.clamp(MIN_RATE, MAX_RATE);
        self.rate
    }
}

/// The cost of a launch of `grid` blocks.
pub fn launch_cost(grid: [u32; 3]) -> u64 {
    grid.iter()
        .map(|&d| u64::from(d.max(1)))
        .fold(1u64, u64::saturating_mul)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that runs `work / capacity` of every tick's launched work, queueing the rest.
    struct SimulatedGpu {
        capacity_per_tick: f64,
        backlog: f64,
    }

    impl SimulatedGpu {
        fn tick(&mut self, launched: f64) -> f64 {
            self.backlog += launched;
            let done = self.backlog.min(self.capacity_per_tick);
            self.backlog -= done;
            100.0 * done / self.capacity_per_tick
        }
    }

    /// A greedy application: it launches whenever the bucket lets it, up to a queue depth.
    fn run(target: u32, ticks: usize, processes: usize) -> Vec<f64> {
        let mut gpu = SimulatedGpu {
            capacity_per_tick: 10_000.0,
            backlog: 0.0,
        };
        let buckets: Vec<Bucket> = (0..processes).map(|_| Bucket::new()).collect();
        let mut controllers: Vec<Controller> =
            (0..processes).map(|_| Controller::new(target)).collect();
        let mut utils = Vec::new();
        let mut last_util = None;
        for _ in 0..ticks {
            let mut launched = 0.0;
            for bucket in &buckets {
                // The driver's queue blocks a greedy launcher once it is deep enough.
                while gpu.backlog + launched < 3.0 * gpu.capacity_per_tick && bucket.try_take(64) {
                    launched += 64.0;
                }
            }
            let util = gpu.tick(launched);
            utils.push(util);
            for (bucket, controller) in buckets.iter().zip(controllers.iter_mut()) {
                let (consumed, starved) = bucket.end_tick();
                bucket.refill(controller.update(consumed, last_util, starved));
            }
            last_util = Some(util);
        }
        utils
    }

    fn mean(values: &[f64]) -> f64 {
        values.iter().sum::<f64>() / values.len() as f64
    }

    #[test]
    fn converges_on_the_target() {
        for target in [10, 30, 50, 90] {
            let utils = run(target, 400, 1);
            let settled = mean(&utils[200..]);
            assert!(
                (settled - f64::from(target)).abs() < 5.0,
                "target {target}: settled at {settled:.1}"
            );
        }
    }

    #[test]
    fn several_processes_share_one_target() {
        let utils = run(30, 400, 3);
        let settled = mean(&utils[200..]);
        assert!((settled - 30.0).abs() < 5.0, "settled at {settled:.1}");
    }

    #[test]
    fn an_idle_process_keeps_its_rate() {
        let mut controller = Controller::new(30);
        let before = controller.update(1000, Some(60.0), false);
        assert_eq!(controller.update(0, Some(0.0), false), before);
        assert_eq!(controller.update(0, None, true), before);
        assert!(controller.update(0, Some(0.0), true) > before);
    }

    #[test]
    fn a_launch_may_overdraw_once() {
        let bucket = Bucket::new();
        bucket.refill(10.0);
        assert!(bucket.try_take(1000));
        assert!(!bucket.try_take(1));
        assert_eq!(bucket.end_tick(), (1000, true));
        bucket.refill(10.0);
        assert!(
            bucket.tokens() <= 0,
            "the debt is carried into the next tick"
        );
    }

    #[test]
    fn launch_cost_counts_blocks_and_never_overflows() {
        assert_eq!(launch_cost([4, 2, 1]), 8);
        assert_eq!(launch_cost([0, 0, 0]), 1);
        assert_eq!(launch_cost([u32::MAX; 3]), u64::MAX);
    }
}
