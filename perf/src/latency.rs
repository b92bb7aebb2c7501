//! The clocks of a run, kept honest.
//!
//! Closed loop (no `--rate`): a PUBLISH's latency runs from the moment its batch was written.
//! Open loop (`--rate`): every message has an *intended* send time on a fixed schedule, and its
//! latency runs from that time, not from when the generator got round to sending it. When the
//! broker stalls, the window fills, sends fall behind schedule, and the messages that wait pay
//! for the stall in their latency: without this, a generator that politely waits would record
//! only the few slow messages and hide the stall (coordinated omission).
//!
//! PUBACKs come back in order on one connection (MQTT 3.1.1 4.6), so a FIFO of send times per
//! connection pairs each PUBACK with its PUBLISH without a map or a lookup by packet id.

use std::collections::VecDeque;
use std::time::Instant;

use hdrhistogram::Histogram;

/// Highest latency a histogram holds; higher values are recorded as this (a minute).
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// An empty latency histogram in microseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant bounds hdrhistogram accepts")
}

/// Nanoseconds since one shared start, so that threads' times compare and fit in a `u64`.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Send times of one connection's unacknowledged PUBLISHes, oldest first. Its capacity is the
/// window, reserved up front, so pushing never allocates in the steady state.
#[derive(Debug)]
pub struct SendTimes {
    times_ns: VecDeque<u64>,
}

impl SendTimes {
    pub fn with_window(window: usize) -> Self {
        Self {
            times_ns: VecDeque::with_capacity(window),
        }
    }

    /// Records a PUBLISH sent (closed loop) or intended (open loop) at `at_ns`.
    pub fn push(&mut self, at_ns: u64) {
        self.times_ns.push_back(at_ns);
    }

    /// The latency in microseconds of the oldest PUBLISH, acknowledged at `now_ns`; `None` for
    /// a PUBACK with nothing outstanding (a broker fault, counted by the caller).
    pub fn ack(&mut self, now_ns: u64) -> Option<u64> {
        let sent_ns = self.times_ns.pop_front()?;
        Some(now_ns.saturating_sub(sent_ns) / 1_000)
    }

    pub fn len(&self) -> usize {
        self.times_ns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times_ns.is_empty()
    }
}

/// The fixed schedule of one connection in an open-loop run: one message every `interval_ns`,
/// whether or not the previous one could be sent on time.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    next_ns: u64,
    interval_ns: u64,
}

impl Pacer {
    /// `rate_per_sec` messages per second, the first intended at `first_ns`.
    pub fn new(rate_per_sec: f64, first_ns: u64) -> Self {
        let interval_ns = (1e9 / rate_per_sec.max(1e-6)).clamp(1.0, u64::MAX as f64) as u64;
        Self {
            next_ns: first_ns,
            interval_ns: interval_ns.max(1),
        }
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// When the next message is intended.
    pub fn next_ns(&self) -> u64 {
        self.next_ns
    }

    /// The intended time of the next message if it is due at `now_ns`, advancing the schedule.
    /// The schedule does not move with the sender: a message that could not go out on time
    /// keeps its intended time, and its latency counts from it.
    pub fn take_due(&mut self, now_ns: u64) -> Option<u64> {
        if self.next_ns > now_ns {
            return None;
        }
        let intended = self.next_ns;
        self.next_ns = self.next_ns.saturating_add(self.interval_ns);
        Some(intended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn closed_loop_latency_is_ack_minus_send() {
        let mut times = SendTimes::with_window(4);
        times.push(10 * MS);
        times.push(11 * MS);
        assert_eq!(times.ack(12 * MS), Some(2_000));
        assert_eq!(times.ack(12 * MS), Some(1_000));
        assert_eq!(
            times.ack(13 * MS),
            None,
            "a PUBACK with nothing outstanding"
        );
        assert!(times.is_empty());
    }

    /// A broker that stalls for 100 ms while the schedule asks for one message per ms with a
    /// window of 1: the messages that had to wait count the wait, from their intended times.
    #[test]
    fn open_loop_latency_counts_from_the_intended_time() {
        let mut pacer = Pacer::new(1_000.0, 0);
        let mut times = SendTimes::with_window(1);
        let mut latencies = Vec::new();
        // t = 0: the first message goes out on time.
        let first = pacer.take_due(0).unwrap();
        times.push(first);
        // The PUBACK arrives 100 ms late; meanwhile the window (1) was full, so nothing was sent,
        // but the schedule kept running.
        let mut now = 100 * MS;
        latencies.push(times.ack(now).unwrap());
        // Catch up: each message is sent as soon as the window allows and acknowledged 10 us
        // later, which a generator measuring from the actual send would report as 10 us.
        while let Some(intended) = pacer.take_due(now) {
            times.push(intended);
            now += 10_000;
            latencies.push(times.ack(now).unwrap());
        }
        assert_eq!(latencies[0], 100_000);
        // The second message was intended at 1 ms and acknowledged at 100.01 ms.
        assert_eq!(latencies[1], 99_010);
        assert!(latencies.iter().all(|&l| l >= 10), "{latencies:?}");
        // Every message scheduled during the stall was counted (0..=100 ms, plus the one due at
        // 101 ms while catching up took 1 ms), most with tens of milliseconds: the stall is
        // visible in the percentiles.
        assert_eq!(latencies.len(), 102);
        let mut histogram = histogram();
        for l in &latencies {
            histogram.record(*l).unwrap();
        }
        assert!(histogram.value_at_quantile(0.5) > 40_000);
    }

    #[test]
    fn pacer_keeps_its_schedule() {
        let mut pacer = Pacer::new(100.0, 5 * MS);
        assert_eq!(pacer.interval_ns(), 10 * MS);
        assert_eq!(pacer.take_due(4 * MS), None);
        assert_eq!(pacer.take_due(5 * MS), Some(5 * MS));
        assert_eq!(pacer.take_due(40 * MS), Some(15 * MS));
        assert_eq!(pacer.take_due(40 * MS), Some(25 * MS));
        assert_eq!(pacer.take_due(40 * MS), Some(35 * MS));
        assert_eq!(pacer.take_due(40 * MS), None);
        assert_eq!(pacer.next_ns(), 45 * MS);
    }
}
