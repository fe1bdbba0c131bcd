//! `clipft eval`: text-to-image retrieval metrics of a model on labelled query and index data.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;
use crate::docarray::{read_labeled, Modality};
use crate::eval::{evaluate_model, Stage};
use crate::model::{Encoder, Towers};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text queries with labels: CSV (`caption,label`) or a docarray v1 file with
    /// `tags['finetuner_label']`.
    #[arg(long, env = "CLIPFT_QUERY_DATA")]
    pub query_data: PathBuf,
    /// Images with labels: CSV (`image,label`) or a docarray v1 file.
    #[arg(long, env = "CLIPFT_INDEX_DATA")]
    pub index_data: PathBuf,
    /// Matches retrieved per query (Finetuner's default: 20).
    #[arg(long, env = "CLIPFT_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10000))]
    pub limit: u64,
    /// How matches are ordered (Finetuner's EvaluationCallback `distance`).
    #[arg(long, env = "CLIPFT_DISTANCE", value_parser = super::choice(&crate::eval::Distance::CHOICES), default_value = "cosine")]
    pub distance: crate::eval::Distance,
    /// Print one JSON object with the nine metrics (and `examples` with --example-queries).
    #[arg(long, env = "CLIPFT_JSON")]
    pub json: bool,
    /// Also show the top matches of the first N queries (as `fit --example-queries`).
    #[arg(long, env = "CLIPFT_EXAMPLE_QUERIES", default_value_t = 0)]
    pub example_queries: usize,
    /// Inputs per forward pass while embedding (`CLIPFT_BATCH_SIZE` is the training batch of
    /// `fit`).
    #[arg(long, env = "CLIPFT_EVAL_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub batch_size: u64,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let queries = read_labeled(&args.query_data, Modality::Text)?;
    let index = read_labeled(&args.index_data, Modality::Image)?;
    let (files, opts) = args.model.resolve(Towers::ALL)?;
    let enc = Encoder::load(&files, &opts)?;
    let bar = progress_bar(queries.len() + index.len());
    let eval = evaluate_model(
        &enc,
        &queries,
        &index,
        (args.limit as usize, args.distance),
        args.batch_size as usize,
        &crate::docarray::HttpFetch::DATASET,
        &mut |stage, n| {
            if let Some(b) = &bar {
                b.set_message(match stage {
                    Stage::Queries => "queries",
                    Stage::Index => "index",
                });
                b.inc(n as u64);
            }
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let examples = crate::eval::examples(
        &eval,
        &queries,
        &index,
        args.index_data.parent(),
        args.example_queries,
        args.limit as usize,
    );
    if args.json {
        let mut v = serde_json::to_value(eval.mean)?;
        if args.example_queries > 0 {
            v["examples"] = serde_json::to_value(&examples)?;
        }
        outln!("{v}");
    } else {
        outln!("{}", metrics_table(&[("value", &eval.mean)]));
        super::output::out_raw(&example_tables(&[("of the model", &examples)]));
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal.
pub fn progress_bar(len: usize) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} ({rate}, {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            // indicatif's own {per_sec} prints four decimals ("65.2001/s").
            .with_key(
                "rate",
                |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}/s", s.per_sec());
                },
            )
            .progress_chars("=> "),
    );
    Some(bar)
}

/// The metrics as a table with one value column per entry (e.g. before / after).
pub fn metrics_table(columns: &[(&str, &crate::eval::Metrics)]) -> String {
    let mut out = format!("{:<20}", "metric");
    for (name, _) in columns {
        out.push_str(&format!(" {name:>10}"));
    }
    for (i, metric) in crate::eval::Metrics::NAMES.iter().enumerate() {
        out.push_str(&format!("\n{metric:<20}"));
        for (_, m) in columns {
            out.push_str(&format!(" {:>10.4}", m.values()[i]));
        }
    }
    out
}

/// Matches per query the example tables show (Finetuner's `display_examples(k=5)`).
pub const EXAMPLE_MATCHES_SHOWN: usize = 5;

/// Example results before and after fine-tuning as text; empty when there are none.
pub fn examples_text(examples: &crate::eval::ExampleResults) -> String {
    example_tables(&[
        ("before fine-tuning", &examples.before),
        ("after fine-tuning", &examples.after),
    ])
}

/// Each titled list of examples: its queries with their top matches.
fn example_tables(stages: &[(&str, &[crate::eval::Example])]) -> String {
    let mut out = String::new();
    for (stage, list) in stages {
        if list.is_empty() {
            continue;
        }
        out.push_str(&format!("results {stage}:\n"));
        for x in list.iter() {
            out.push_str(&format!("  query: {}\n", x.query));
            for (i, m) in x.matches.iter().take(EXAMPLE_MATCHES_SHOWN).enumerate() {
                out.push_str(&format!("    {}. {m}\n", i + 1));
            }
        }
    }
    out
}
