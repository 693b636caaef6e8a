//! The run's trace: a ring of the last events (time, node, what, numbers,
//! note), kept without allocating per event; a failing seed prints it, and
//! `PGMIRROR_SIM_SEED` prints every line of one run.

use std::fmt::Write;

/// How many lines a failing seed shows.
pub const TAIL: usize = 60;

#[derive(Clone, Copy)]
pub struct Line {
    pub t: u64,
    pub node: &'static str,
    pub what: &'static str,
    pub a: u64,
    pub b: u64,
    pub note: &'static str,
}

pub struct Trace {
    ring: Vec<Line>,
    next: usize,
    pub verbose: bool,
}

impl Trace {
    pub fn new(verbose: bool) -> Self {
        Trace {
            ring: Vec::with_capacity(TAIL),
            next: 0,
            verbose,
        }
    }

    pub fn push(&mut self, line: Line) {
        if self.verbose {
            println!("{}", render(&line));
            return;
        }
        if self.ring.len() < TAIL {
            self.ring.push(line);
        } else {
            self.ring[self.next] = line;
        }
        self.next = (self.next + 1) % TAIL;
    }

    /// The last lines, oldest first.
    pub fn tail(&self) -> String {
        let mut out = String::new();
        let (newer, older) = self.ring.split_at(self.next.min(self.ring.len()));
        for line in older.iter().chain(newer) {
            let _ = writeln!(out, "{}", render(line));
        }
        out
    }
}

const ACTIONS: [&str; 13] = [
    "",
    "HandOver",
    "StartPrincipal",
    "StartMirror",
    "Stop",
    "Promote",
    "Rewind",
    "TakeCopy",
    "RequireSync",
    "RecordAtWitness",
    "AskPromotion",
    "CloseStreams",
    "FinishPromotion",
];

fn render(line: &Line) -> String {
    let mut out = format!("{:>7} ms  {:<9} {:<16}", line.t, line.node, line.what);
    match line.what {
        "decide" | "apply" => {
            // a: action codes, 5 bits each (low first) with a flag bit;
            // b: role, synchronized, suspended, promoting, handing over, epoch.
            let mut codes = line.a;
            let mut names = Vec::new();
            while codes != 0 {
                let code = (codes & 0x1f) as usize;
                let flag = codes & 0x20 != 0;
                let name = ACTIONS.get(code & 0xf).copied().unwrap_or("?");
                names.push(match (name, flag) {
                    ("RequireSync", f) | ("RecordAtWitness", f) => format!("{name}({f})"),
                    ("StartPrincipal", f) => format!("{name}(sync={f})"),
                    ("Stop", f) => format!("Stop({})", if f { "immediate" } else { "fast" }),
                    _ => name.to_string(),
                });
                codes >>= 6;
            }
            let role = if line.b & 1 == 1 {
                "principal"
            } else {
                "mirror"
            };
            let _ = write!(
                out,
                "-> {role}{}{} epoch {} sync={} susp={} [{}]",
                if line.b & 8 != 0 { " (promoting)" } else { "" },
                if line.b & 16 != 0 {
                    " (handing over)"
                } else {
                    ""
                },
                line.b >> 8,
                line.b & 2 != 0,
                line.b & 4 != 0,
                names.join(", ")
            );
        }
        _ => {
            let _ = write!(out, "a={} b={}", line.a, line.b);
        }
    }
    if !line.note.is_empty() {
        let _ = write!(out, "  ({})", line.note);
    }
    out
}
