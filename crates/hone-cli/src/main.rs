//! `hone`: the command-line fine-tuner.

mod backend;
mod check_adapter;
mod compare;
mod export;
mod generate;
mod hub;
mod model;
mod logits;
mod merge;
mod metrics;
mod plan;
mod quantize;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "hone", version, about = "QLoRA fine-tuning of causal language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the model on some tokens and write the logits ([sequence, vocab], f32) to a
    /// safetensors file, to compare with transformers.
    Logits(logits::Args),
    /// Generate a reply (chat-formatted unless --raw) with a model and an optional adapter.
    Generate(generate::Args),
    /// What vLLM, llama.cpp or PEFT will refuse in an adapter, or read with another result.
    CheckAdapter(check_adapter::Args),
    /// Write an adapter in another runtime's format: a llama.cpp LoRA adapter GGUF.
    Export(export::Args),
    /// Merge a LoRA adapter into its base: a Hugging Face directory, or a GGUF for llama.cpp.
    Merge(merge::Args),
    /// Save a model pre-quantized to NF4 in bitsandbytes' layout.
    Quantize(quantize::Args),
    /// Fine-tune a LoRA adapter (QLoRA on an NF4 base by default) and write it in PEFT's format.
    Train(train::TrainArgs),
    /// Loss and perplexity of a model (with an adapter) on a dataset.
    Eval(train::EvalArgs),
    /// The memory a fine-tune needs, from the model's config alone.
    Plan(plan::Args),
    /// The base and each adapter on held-out data: loss, replies scored against the references,
    /// forgetting on general text; a report as HTML, Markdown and JSON.
    Compare(compare::Args),
}

fn main() {
    let cli = Cli::parse();
    // A bad HONE_CPU_LEVEL is a clear error now, not a panic inside the first kernel.
    if let Err(e) = hone::ops::simd::CpuLevel::from_env() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let result = match cli.command {
        Command::Logits(args) => logits::run(args),
        Command::Export(args) => export::run(args),
        Command::CheckAdapter(args) => match check_adapter::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Command::Merge(args) => merge::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Plan(args) => plan::run(args),
        Command::Compare(args) => compare::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every subcommand and flag says what it is for, and every optional flag that takes a value
    /// shows its default: clap's own `[default: …]`, or one written into the help where the
    /// default is worked out later (flags a config file can also set).
    #[test]
    fn every_flag_has_help_and_shows_its_default() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(format!("hone {}: no description", sub.get_name()));
            }
            for arg in sub.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
                let name = format!("hone {} --{}", sub.get_name(), arg.get_long().unwrap_or(arg.get_id().as_str()));
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{name}: no help"));
                    continue;
                }
                let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values()) && !matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::Help | clap::ArgAction::Version);
                let shows_default = !arg.get_default_values().is_empty() || help.contains("[default: ") || help.contains("(required") || help.contains("(or give --");
                if takes_value && !arg.is_required_set() && !shows_default {
                    missing.push(format!("{name}: no default shown ({help:?})"));
                }
            }
        }
        assert!(missing.is_empty(), "flags without help or default:\n{}", missing.join("\n"));
    }

    /// The defaults written into `hone train`'s help are the ones the run uses.
    #[test]
    fn train_help_defaults_are_the_real_ones() {
        let settings = hone::train::RunSettings::default();
        let lora = settings.lora();
        let train = settings.train(0).unwrap();
        let expect = [
            ("rank", lora.r.to_string()),
            ("alpha", lora.alpha.to_string()),
            ("dropout", lora.dropout.to_string()),
            ("lr", train.lr.to_string()),
            ("warmup-steps", train.warmup_steps.to_string()),
            ("weight-decay", train.adamw.weight_decay.to_string()),
            ("adam-epsilon", format!("{:e}", train.adamw.eps)),
            ("max-grad-norm", train.max_grad_norm.unwrap_or(0.0).to_string()),
            ("epochs", train.epochs.to_string()),
            ("batch-size", train.batch_size.to_string()),
            ("grad-accum", train.grad_accum.to_string()),
            ("seed", settings.seed().to_string()),
            ("schedule", format!("{:?}", train.schedule).to_lowercase()),
            ("checkpointing", if train.checkpointing { "on" } else { "off" }.to_string()),
            ("quantize", if settings.nf4().unwrap().is_some() { "nf4" } else { "none" }.to_string()),
        ];
        let cli = Cli::command();
        let train_cmd = cli.find_subcommand("train").unwrap();
        for (flag, value) in expect {
            let arg = train_cmd.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap_or_else(|| panic!("no --{flag}"));
            let help = arg.get_help().unwrap().to_string();
            let shown = help.split("[default: ").nth(1).and_then(|r| r.split(']').next()).unwrap_or_else(|| panic!("--{flag}: no default in {help:?}"));
            assert_eq!(shown, value, "--{flag}'s help says {shown}, the run uses {value}");
        }
    }
}
