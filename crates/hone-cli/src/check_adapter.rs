//! `hone check-adapter`: what vLLM, llama.cpp or PEFT will refuse or read differently.

use hone::export::check::{check_adapter, Runtime, Verdict};
use hone::io::Dir;
use std::path::PathBuf;

#[derive(Clone, Copy, clap::ValueEnum)]
enum For {
    Vllm,
    #[value(name = "llama.cpp")]
    LlamaCpp,
    Peft,
    All,
}

#[derive(clap::Args)]
pub struct Args {
    /// The PEFT LoRA adapter directory.
    dir: PathBuf,
    /// The runtime to check for.
    #[arg(long = "for", value_enum, default_value = "all")]
    runtime: For,
    /// The --max-lora-rank the vLLM server runs with.
    #[arg(long, default_value_t = 16)]
    max_lora_rank: usize,
}

/// Exit status 1 when a runtime refuses the adapter; findings that only change results are
/// printed and leave it 0.
pub fn run(args: Args) -> anyhow::Result<bool> {
    let runtimes: Vec<Runtime> = match args.runtime {
        For::Vllm => vec![Runtime::Vllm],
        For::LlamaCpp => vec![Runtime::LlamaCpp],
        For::Peft => vec![Runtime::Peft],
        For::All => Runtime::ALL.to_vec(),
    };
    let findings = check_adapter(&Dir(args.dir.clone()), &runtimes, args.max_lora_rank)?;
    for rt in &runtimes {
        let mine: Vec<_> = findings.iter().filter(|f| f.runtime == *rt).collect();
        if mine.is_empty() {
            println!("{rt}: ok");
        }
        for f in mine {
            let verdict = match f.verdict {
                Verdict::Refuses => "refuses",
                Verdict::Differs => "differs",
            };
            println!("{rt}: {verdict}: {}", f.message);
        }
    }
    Ok(findings.iter().all(|f| f.verdict != Verdict::Refuses))
}
