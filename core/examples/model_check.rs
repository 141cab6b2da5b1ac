//! Runs the protocol's model check (`scripts/model-check.sh` calls it):
//! `--depth N`, `--long`, `--deregistration` (the deregistration's own
//! scope), `--mutant NAME` (`--mutant list` names them), `--threads N`. Exit 0 when every property held, 1 on a violation, 2 on
//! a bad argument.

use std::process::ExitCode;

use room_allocator_core::model::{check, mutants::Mutant, Bounded};

fn main() -> ExitCode {
    let mut long = false;
    let mut deregistration = false;
    let mut depth = None;
    let mut mutant = None;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--long" => long = true,
            "--deregistration" => deregistration = true,
            "--depth" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => depth = Some(n),
                None => return usage("--depth needs a number of steps"),
            },
            "--threads" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => threads = n,
                None => return usage("--threads needs a number"),
            },
            "--mutant" => match args.next().as_deref() {
                Some("list") => {
                    for m in Mutant::ALL {
                        println!("{}", m.name());
                    }
                    return ExitCode::SUCCESS;
                }
                Some(name) => match Mutant::from_name(name) {
                    Some(m) => mutant = Some(m),
                    None => return usage(&format!("no mutant {name:?}; --mutant list names them")),
                },
                None => return usage("--mutant needs a name (or list)"),
            },
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let mut bounds = match (mutant, long) {
        (Some(m), _) => Bounded::for_mutant(m),
        (None, _) if deregistration => Bounded::DEREGISTRATION,
        (None, true) => Bounded::LONG,
        (None, false) => Bounded::DEFAULT,
    };
    if long && (mutant.is_some() || deregistration) {
        bounds.depth += if deregistration { 2 } else { 4 };
    }
    if let Some(depth) = depth {
        bounds.depth = depth;
    }
    if let Some(m) = mutant {
        println!("mutant: {}", m.name());
    }
    let report = check(bounds, mutant, threads);
    print!("{}", report.traces());
    eprintln!("checked in {:.1} s", report.elapsed.as_secs_f64());
    println!("{}", report.summary());
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("model-check: {problem}");
    eprintln!("usage: model-check [--depth N] [--long] [--deregistration] [--mutant NAME|list] [--threads N]");
    ExitCode::from(2)
}
