//! The test workload: a process whose whole state can be checked after a
//! resume.
//!
//! Each worker thread owns a slice of memory filled with a known pattern and a
//! step counter; step `c` writes word `c mod W` of its slice, so the expected
//! contents of every word follow from the counter alone. On SIGUSR1 every
//! worker verifies all of its memory against its counter and prints one line.
//! With `--avx512` one more thread keeps values in zmm16..zmm31 across long
//! loops and checks them after each loop. After `--steps` steps each worker
//! prints a final line with a checksum that depends only on the arguments, so
//! an interrupted-and-resumed run must print the same lines as a plain one.
//!
//! With `--stall` one more thread reads the clock in a tight loop and, on
//! SIGUSR1, reports the longest gap it saw since the previous report: how
//! long the process was stopped, seen from inside.
//!
//! With `--churn M` one more thread populates an M MiB arena page by page
//! (first word of page i of round r = a hash of r and i), then discards it
//! all with MADV_DONTNEED and starts the next round: pages appear and go
//! all the time, as in a program that allocates and frees. On SIGUSR1 it
//! checks that the pages it populated this round hold their value and the
//! others read zero.
//!
//! Output lines (stdout, line-buffered):
//!   ready pid=P threads=T mib=N
//!   verify t=I counter=C ok            (or `verify t=I counter=C BAD word=K`)
//!   zmm ok loops=L                      (after each loop; `zmm BAD` then exit 3)
//!   done t=I counter=C sum=S
//!   stall max_us=U
//!   touch t=I us=T                     (on SIGUSR2: one read per page, timed)
//!   churn round=R at=P ok               (or `churn round=R BAD page=K`)

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static VERIFY_REQUESTS: AtomicU64 = AtomicU64::new(0);
static TOUCH_REQUESTS: AtomicU64 = AtomicU64::new(0);

struct Args {
    mib: usize,
    threads: usize,
    steps: u64,
    sleep_every: u64,
    avx512: bool,
    stall: bool,
    churn_mib: usize,
    seed: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        mib: 16,
        threads: 1,
        steps: u64::MAX,
        sleep_every: 4096,
        avx512: false,
        stall: false,
        churn_mib: 0,
        seed: 1,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = |i: usize| -> u64 {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{} needs a number", argv[i])))
        };
        match argv[i].as_str() {
            "--mib" => a.mib = val(i) as usize,
            "--threads" => a.threads = val(i).max(1) as usize,
            "--steps" => a.steps = val(i),
            "--sleep-every" => a.sleep_every = val(i).max(1),
            "--seed" => a.seed = val(i),
            "--churn" => a.churn_mib = val(i) as usize,
            "--avx512" => {
                a.avx512 = true;
                i += 1;
                continue;
            }
            "--stall" => {
                a.stall = true;
                i += 1;
                continue;
            }
            other => usage(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("workload: {msg}\nusage: workload [--mib N] [--threads T] [--steps S] [--sleep-every K] [--seed X] [--avx512] [--stall] [--churn M]");
    std::process::exit(2)
}

/// splitmix64: the pattern's value for word `k`.
fn hash(seed: u64, k: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(k.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What word `k` of a slice of `w` words holds after `counter` steps: the
/// last step `c <= counter` with `c % w == k` wrote `hash ^ c`, if any did.
fn expected(seed: u64, k: u64, w: u64, counter: u64) -> u64 {
    let back = (counter % w + w - k) % w;
    if back < counter {
        hash(seed, k) ^ (counter - back)
    } else {
        hash(seed, k)
    }
}

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn fill(t: usize, args: &Args, words: usize) -> Vec<u64> {
    let seed = args.seed.wrapping_add(t as u64);
    (0..words as u64).map(|k| hash(seed, k)).collect()
}

fn worker(t: usize, args: &Args, mut mem: Vec<u64>) {
    let seed = args.seed.wrapping_add(t as u64);
    let w = mem.len() as u64;
    let mut seen = 0u64;
    let mut touched = 0u64;
    let mut counter = 0u64;
    while counter < args.steps {
        counter += 1;
        let k = (counter % w) as usize;
        mem[k] = hash(seed, k as u64) ^ counter;
        let req = VERIFY_REQUESTS.load(Ordering::Relaxed);
        if req != seen {
            seen = req;
            verify(t, seed, &mem, counter);
        }
        let req = TOUCH_REQUESTS.load(Ordering::Relaxed);
        if req != touched {
            touched = req;
            touch(t, &mem);
        }
        if counter.is_multiple_of(args.sleep_every) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let sum = mem.iter().fold(0u64, |acc, v| {
        acc.rotate_left(5) ^ v.wrapping_mul(0x100_0000_01B3)
    });
    verify(t, seed, &mem, counter);
    out(format!("done t={t} counter={counter} sum={sum:016x}"));
}

/// Reads one word of every page: how long it takes to reach all memory
/// (after a lazy resume, every page comes through the pager).
fn touch(t: usize, mem: &[u64]) {
    let t0 = std::time::Instant::now();
    let mut acc = 0u64;
    for page in mem.chunks(512) {
        acc = acc.wrapping_add(page[0]);
    }
    std::hint::black_box(acc);
    out(format!("touch t={t} us={}", t0.elapsed().as_micros()));
}

fn verify(t: usize, seed: u64, mem: &[u64], counter: u64) {
    let w = mem.len() as u64;
    for (k, v) in mem.iter().enumerate() {
        if *v != expected(seed, k as u64, w, counter) {
            out(format!("verify t={t} counter={counter} BAD word={k}"));
            return;
        }
    }
    out(format!("verify t={t} counter={counter} ok"));
}

#[cfg(target_arch = "x86_64")]
mod zmm {
    use std::arch::asm;

    /// Loads zmm16..zmm31 from `input`, spins `iters` times bumping `*counter`,
    /// then stores them to `output`. A snapshot taken during the spin must
    /// carry the registers over.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn spin(input: &[u64; 128], output: &mut [u64; 128], iters: u64, counter: *mut u64) {
        // SAFETY: the pointers cover 16 x 64 bytes each; the caller checked AVX-512F.
        unsafe {
            asm!(
                "vmovdqu64 zmm16, [{i}]", "vmovdqu64 zmm17, [{i} + 64]",
                "vmovdqu64 zmm18, [{i} + 128]", "vmovdqu64 zmm19, [{i} + 192]",
                "vmovdqu64 zmm20, [{i} + 256]", "vmovdqu64 zmm21, [{i} + 320]",
                "vmovdqu64 zmm22, [{i} + 384]", "vmovdqu64 zmm23, [{i} + 448]",
                "vmovdqu64 zmm24, [{i} + 512]", "vmovdqu64 zmm25, [{i} + 576]",
                "vmovdqu64 zmm26, [{i} + 640]", "vmovdqu64 zmm27, [{i} + 704]",
                "vmovdqu64 zmm28, [{i} + 768]", "vmovdqu64 zmm29, [{i} + 832]",
                "vmovdqu64 zmm30, [{i} + 896]", "vmovdqu64 zmm31, [{i} + 960]",
                "2:",
                "inc qword ptr [{c}]",
                "pause",
                "dec {n}",
                "jnz 2b",
                "vmovdqu64 [{o}], zmm16", "vmovdqu64 [{o} + 64], zmm17",
                "vmovdqu64 [{o} + 128], zmm18", "vmovdqu64 [{o} + 192], zmm19",
                "vmovdqu64 [{o} + 256], zmm20", "vmovdqu64 [{o} + 320], zmm21",
                "vmovdqu64 [{o} + 384], zmm22", "vmovdqu64 [{o} + 448], zmm23",
                "vmovdqu64 [{o} + 512], zmm24", "vmovdqu64 [{o} + 576], zmm25",
                "vmovdqu64 [{o} + 640], zmm26", "vmovdqu64 [{o} + 704], zmm27",
                "vmovdqu64 [{o} + 768], zmm28", "vmovdqu64 [{o} + 832], zmm29",
                "vmovdqu64 [{o} + 896], zmm30", "vmovdqu64 [{o} + 960], zmm31",
                i = in(reg) input.as_ptr(),
                o = in(reg) output.as_mut_ptr(),
                c = in(reg) counter,
                n = inout(reg) iters => _,
                out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
                out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
                out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _,
                out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
                options(nostack),
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn zmm_thread(seed: u64) {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        out("zmm unsupported".to_string());
        return;
    }
    let mut loops = 0u64;
    let mut spins = 0u64;
    loop {
        let input: [u64; 128] = std::array::from_fn(|k| hash(seed ^ 0x2a2a, k as u64 + loops));
        let mut output = [0u64; 128];
        // SAFETY: AVX-512F was detected above.
        unsafe { zmm::spin(&input, &mut output, 5_000_000, &mut spins) };
        loops += 1;
        if output != input {
            out(format!("zmm BAD loops={loops}"));
            std::process::exit(3);
        }
        out(format!("zmm ok loops={loops}"));
    }
}

/// Reads the clock in a tight loop; reports the longest gap on request.
fn stall_thread() {
    let mut seen = VERIFY_REQUESTS.load(Ordering::Relaxed);
    let mut prev = std::time::Instant::now();
    let mut max = Duration::ZERO;
    loop {
        let now = std::time::Instant::now();
        max = max.max(now - prev);
        prev = now;
        let req = VERIFY_REQUESTS.load(Ordering::Relaxed);
        if req != seen {
            seen = req;
            out(format!("stall max_us={}", max.as_micros()));
            max = Duration::ZERO;
            prev = std::time::Instant::now();
        }
    }
}

/// Populates an arena page by page and discards it whole, round after
/// round; checks it on request (see the module doc).
fn churn_thread(mib: usize) {
    const PAGE: usize = 4096;
    let len = mib << 20;
    // SAFETY: a fresh private anonymous mapping, used only by this thread.
    let arena = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(arena, libc::MAP_FAILED, "mmap churn arena");
    let word = |i: usize| (arena as usize + i * PAGE) as *mut u64;
    let pages = len / PAGE;
    // Never 0, which a page that was not populated reads.
    let value = |round: u64, i: usize| hash(round + 1, i as u64) | 1;
    let mut seen = VERIFY_REQUESTS.load(Ordering::Relaxed);
    for round in 0u64.. {
        for at in 0..=pages {
            let req = VERIFY_REQUESTS.load(Ordering::Relaxed);
            if req != seen {
                seen = req;
                let bad = (0..pages).find(|&i| {
                    let want = if i < at { value(round, i) } else { 0 };
                    // SAFETY: every page index is inside the arena.
                    let got = unsafe { word(i).read_volatile() };
                    got != want
                });
                match bad {
                    Some(i) => out(format!("churn round={round} BAD page={i}")),
                    None => out(format!("churn round={round} at={at} ok")),
                }
            }
            if at < pages {
                // SAFETY: inside the arena.
                unsafe { word(at).write_volatile(value(round, at)) };
            }
            // A round lasts longer than a lazy copy of a small process, so
            // that not every snapshot meets a discard (and is taken again).
            if at % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        // SAFETY: discarding our own arena.
        unsafe { libc::madvise(arena, len, libc::MADV_DONTNEED) };
    }
}

extern "C" fn on_usr1(_: libc::c_int) {
    VERIFY_REQUESTS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_usr2(_: libc::c_int) {
    TOUCH_REQUESTS.fetch_add(1, Ordering::Relaxed);
}

fn main() {
    let args = parse_args();
    // SAFETY: the handler only touches an atomic.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR2, on_usr2 as *const () as libc::sighandler_t);
    }
    let words = ((args.mib << 20) / 8 / args.threads).max(1);
    let mut mems: Vec<Vec<u64>> = (0..args.threads).map(|t| fill(t, &args, words)).collect();
    out(format!(
        "ready pid={} threads={} mib={}",
        std::process::id(),
        args.threads,
        args.mib
    ));
    #[cfg(target_arch = "x86_64")]
    if args.avx512 {
        let seed = args.seed;
        std::thread::spawn(move || zmm_thread(seed));
    }
    if args.stall {
        std::thread::spawn(stall_thread);
    }
    if args.churn_mib > 0 {
        let mib = args.churn_mib;
        std::thread::spawn(move || churn_thread(mib));
    }
    std::thread::scope(|s| {
        let first = mems.remove(0);
        for (i, mem) in mems.into_iter().enumerate() {
            let args = &args;
            s.spawn(move || worker(i + 1, args, mem));
        }
        worker(0, &args, first);
    });
}
