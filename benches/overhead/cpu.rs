//! CPU time from `/proc`, and what machine this is.

/// CPU time from `/proc`, in clock ticks (`USER_HZ`, 100 per second on
/// Linux): the whole machine's busy and steal time, and this process's own.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSample {
    pub(crate) busy: u64,
    pub(crate) steal: u64,
    pub(crate) total: u64,
    pub(crate) own: u64,
    /// The part of `own` spent in the kernel (system calls, the network
    /// stack).
    pub(crate) own_system: u64,
}

pub(crate) const TICKS_PER_SECOND: f64 = 100.0;

pub(crate) fn cpu_sample() -> CpuSample {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let own_stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `)` that ends the command name, by position (some,
    // like tpgid, can be -1, so none is skipped).
    let own: Vec<&str> = own_stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let own_field = |i: usize| own.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    CpuSample {
        // Interrupt time is left out: most of it is this run's own loopback
        // traffic, charged to no process.
        busy: field(0) + field(1) + field(2),
        steal: field(7),
        total: (0..8).map(field).sum(),
        // utime and stime are fields 14 and 15 of /proc/self/stat: the 12th
        // and 13th after the `)` (the state letter is the 1st).
        own: own_field(11) + own_field(12),
        own_system: own_field(12),
    }
}

pub(crate) fn machine() -> (String, usize) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count()
        .max(std::thread::available_parallelism().map_or(0, usize::from));
    (model, cores)
}

/// This process's write system calls so far (`syscw` of `/proc/self/io`):
/// socket writes, and the runtime's wake-ups of a parked worker (an
/// `eventfd` write); fewer per event when the connection writes requests
/// in larger batches.
pub(crate) fn write_calls() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:")?.trim().parse().ok())
        .unwrap_or(0)
}
