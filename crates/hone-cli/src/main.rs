//! `hone`: the command-line fine-tuner.

mod backend;
mod generate;
mod model;
mod logits;
mod merge;
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
    /// Merge a LoRA adapter into its base and write a standard model directory.
    Merge(merge::Args),
    /// Save a model pre-quantized to NF4 in bitsandbytes' layout.
    Quantize(quantize::Args),
    /// Fine-tune a LoRA adapter (QLoRA on an NF4 base by default) and write it in PEFT's format.
    Train(train::TrainArgs),
    /// Loss and perplexity of a model (with an adapter) on a dataset.
    Eval(train::EvalArgs),
    /// The memory a fine-tune needs, from the model's config alone.
    Plan(plan::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(args) => logits::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Plan(args) => plan::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
