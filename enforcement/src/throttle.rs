//! The compute cap: a token bucket in front of kernel launches whose tokens are nanoseconds of
//! GPU time, refilled every tick with the claim's share of the tick.
//!
//! A launch takes its expected GPU time (the last measured time of the same kernel or graph)
//! before it runs, and the measured time when it is known (`compute.rs` times a sample of
//! launches with CUDA events), so one long graph pays for all of its run: it cannot buy a
//! tick's worth of GPU for the price of one small launch.
//!
//! Measured time is not the claim's share of the GPU when kernels overlap (several streams,
//! several processes of the claim), so a feedback loop scales the refill by how far the
//! utilization NVML measured for the claim is from the target. Without that measurement the
//! refill is the share itself: open loop, exact for launches that do not overlap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// How often the bucket is refilled and the rate revised.
pub const TICK: Duration = Duration::from_millis(100);
/// The feedback can scale the open-loop rate down to this (e.g. 64 processes of one claim)...
const MIN_FACTOR: f64 = 1.0 / 64.0;
/// ...and up to this (kernels that overlap each other in time).
const MAX_FACTOR: f64 = 8.0;
/// Ticks the feedback loop averages over.
const WINDOW: usize = 20;

/// GPU time the claim may use per tick on one device at `target` percent, in nanoseconds.
pub fn share_of_tick(target: u32) -> f64 {
    f64::from(target.clamp(1, 100)) / 100.0 * TICK.as_nanos() as f64
}

#[derive(Debug, Default)]
pub struct Bucket {
    tokens: AtomicI64,
    consumed: AtomicI64,
    starved: AtomicBool,
}

impl Bucket {
    /// A bucket holding one tick's worth of `rate`.
    pub fn new(rate: f64) -> Self {
        let bucket = Bucket::default();
        bucket.tokens.store(rate as i64, Ordering::Relaxed);
        bucket
    }

    /// Takes `cost` tokens if there are any left; one launch may overdraw the bucket, so a
    /// kernel longer than a tick's budget still runs (and the next ticks pay for it).
    pub fn try_take(&self, cost: u64) -> bool {
        if self.tokens.load(Ordering::Acquire) <= 0 {
            self.starved.store(true, Ordering::Relaxed);
            return false;
        }
        self.adjust(cost.min(i64::MAX as u64) as i64);
        true
    }

    /// Takes `delta` more tokens (gives back when negative): a launch's measured time minus
    /// what it was charged before it ran.
    pub fn adjust(&self, delta: i64) {
        self.tokens.fetch_sub(delta, Ordering::AcqRel);
        self.consumed.fetch_add(delta, Ordering::Relaxed);
    }

    /// Ends a tick: what was consumed and whether a launch had to wait.
    pub fn end_tick(&self) -> (i64, bool) {
        let consumed = self.consumed.swap(0, Ordering::AcqRel);
        let starved = self.starved.swap(false, Ordering::AcqRel);
        (consumed, starved)
    }

    /// Adds `rate` tokens, keeping at most one tick's worth: an idle process cannot save up a
    /// burst. Debt is carried.
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

/// The feedback loop of one device: the refill is the share of a tick times a factor, the
/// ratio of the claim's real use of the GPU to the GPU time its launches were charged, learned
/// over a window of ticks (long launches make single ticks all-or-nothing).
#[derive(Debug, Clone)]
pub struct Controller {
    target: f64,
    factor: f64,
    /// (tokens consumed, claim utilization in percent, whether the rate held a launch back)
    window: VecDeque<(f64, f64, bool)>,
}

impl Controller {
    pub fn new(target_percent: u32) -> Self {
        Controller {
            target: f64::from(target_percent.clamp(1, 100)),
            factor: 1.0,
            window: VecDeque::with_capacity(WINDOW + 1),
        }
    }

    /// The refill of the next tick.
    pub fn rate(&self) -> f64 {
        share_of_tick(self.target as u32) * self.factor
    }

    /// Revises the rate after a tick in which `consumed` tokens were spent, the claim's
    /// processes were measured `util` % busy (`None`: no measurement, the rate stays: open
    /// loop) and `starved` says whether the rate held a launch back.
    pub fn update(&mut self, consumed: i64, util: Option<f64>, starved: bool) -> f64 {
        let Some(util) = util else {
            return self.rate();
        };
        self.window.push_back((consumed as f64, util, starved));
        if self.window.len() > WINDOW {
            self.window.pop_front();
        }
        let consumed: f64 = self.window.iter().map(|w| w.0).sum();
        let busy: f64 = self.window.iter().map(|w| w.1).sum();
        let binding = self.window.iter().any(|w| w.2);
        if self.window.len() >= 3 && busy >= 1.0 && consumed > 0.0 {
            // `consumed` tokens kept the claim `busy` % busy: `consumed × target / busy` would
            // have kept it at the target.
            let estimate = consumed * self.target / busy / share_of_tick(self.target as u32);
            // A rate that did not bind says nothing about raising it.
            if estimate < self.factor || binding {
                self.factor = (0.5 * self.factor + 0.5 * estimate).clamp(MIN_FACTOR, MAX_FACTOR);
            }
        }
        self.rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK_NS: f64 = 100_000_000.0;

    /// A GPU running launches of `duration` ns one after another; `overlap` launches run at
    /// once (several streams), so measured time is `overlap` times the busy time.
    struct SimulatedGpu {
        backlog: f64,
        overlap: f64,
    }

    impl SimulatedGpu {
        /// Runs a tick; returns the utilization in percent.
        fn tick(&mut self, launched_ns: f64) -> f64 {
            self.backlog += launched_ns / self.overlap;
            let done = self.backlog.min(TICK_NS);
            self.backlog -= done;
            100.0 * done / TICK_NS
        }
    }

    /// Greedy processes launching `duration`-ns launches whenever their bucket lets them (up to
    /// a queue of 3 ticks), each charged its exact time; returns the utilization per tick.
    fn run(target: u32, duration: f64, overlap: f64, processes: usize, ticks: usize) -> Vec<f64> {
        let mut gpu = SimulatedGpu {
            backlog: 0.0,
            overlap,
        };
        let mut controllers: Vec<Controller> =
            (0..processes).map(|_| Controller::new(target)).collect();
        let buckets: Vec<Bucket> = controllers.iter().map(|c| Bucket::new(c.rate())).collect();
        let mut utils = Vec::new();
        let mut last_util = None;
        for _ in 0..ticks {
            let mut launched = 0.0;
            for bucket in &buckets {
                while gpu.backlog + launched / overlap < 3.0 * TICK_NS
                    && bucket.try_take(duration as u64)
                {
                    launched += duration;
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
            let settled = mean(&run(target, 64_000.0, 1.0, 1, 400)[100..]);
            assert!(
                (settled - f64::from(target)).abs() < 3.0,
                "target {target}: settled at {settled:.1}"
            );
        }
    }

    #[test]
    fn a_long_launch_pays_for_its_whole_run() {
        // 80 ms graphs against a 30 % share: one graph would be 80 % of a tick.
        for duration_ms in [20.0, 50.0, 80.0, 100.0, 250.0] {
            let settled = mean(&run(30, duration_ms * 1e6, 1.0, 1, 600)[100..]);
            assert!(
                (settled - 30.0).abs() < 3.0,
                "{duration_ms} ms launches: settled at {settled:.1}"
            );
        }
    }

    #[test]
    fn open_loop_holds_the_share_without_measurements() {
        let mut controller = Controller::new(30);
        let bucket = Bucket::new(controller.rate());
        let mut gpu = SimulatedGpu {
            backlog: 0.0,
            overlap: 1.0,
        };
        let mut utils = Vec::new();
        for _ in 0..300 {
            let mut launched = 0.0;
            while gpu.backlog + launched < 3.0 * TICK_NS && bucket.try_take(5_000_000) {
                launched += 5_000_000.0;
            }
            utils.push(gpu.tick(launched));
            let (consumed, starved) = bucket.end_tick();
            bucket.refill(controller.update(consumed, None, starved));
        }
        let settled = mean(&utils[50..]);
        assert!((settled - 30.0).abs() < 2.0, "settled at {settled:.1}");
    }

    #[test]
    fn several_processes_and_overlapping_kernels_share_one_target() {
        let settled = mean(&run(30, 64_000.0, 1.0, 3, 600)[200..]);
        assert!(
            (settled - 30.0).abs() < 3.0,
            "3 processes: settled at {settled:.1}"
        );
        let settled = mean(&run(30, 64_000.0, 4.0, 1, 600)[200..]);
        assert!(
            (settled - 30.0).abs() < 3.0,
            "4 streams: settled at {settled:.1}"
        );
    }

    #[test]
    fn an_idle_process_keeps_its_rate() {
        let mut controller = Controller::new(30);
        let before = controller.rate();
        for _ in 0..10 {
            assert_eq!(controller.update(0, Some(0.0), false), before);
            assert_eq!(controller.update(0, None, true), before);
        }
        // Launching little and not held back: no reason to raise the rate.
        for _ in 0..10 {
            assert_eq!(controller.update(1_000_000, Some(0.5), false), before);
        }
    }

    #[test]
    fn a_launch_may_overdraw_once_and_measured_time_is_settled_later() {
        let bucket = Bucket::new(10.0);
        assert!(bucket.try_take(1000));
        assert!(!bucket.try_take(1));
        assert_eq!(bucket.end_tick(), (1000, true));
        bucket.refill(10.0);
        assert!(
            bucket.tokens() <= 0,
            "the debt is carried into the next tick"
        );
        // Charged 1000, measured 80,000,000: the rest is owed.
        bucket.adjust(80_000_000 - 1000);
        bucket.refill(30_000_000.0);
        assert!(bucket.tokens() < -40_000_000);
        assert_eq!(share_of_tick(30), 30_000_000.0);
    }
}
