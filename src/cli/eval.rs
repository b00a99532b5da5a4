use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use firstkd::eval::{
    evaluate, read_task, reliability_svg, ClozeLayout, EvalItem, EvalOptions, EvalResult, Mode,
    ModeReport, PromptOptions, TaskFormat,
};
use firstkd::teacher::Teacher;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `firstkd eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model: a GGUF file or a Hugging Face checkpoint directory (e.g. a trained student).
    #[arg(long)]
    pub model: PathBuf,
    /// Task file (JSONL or JSON array). See docs/eval.md for the accepted shapes.
    #[arg(long)]
    pub task: PathBuf,
    /// Record shape: auto, generic, boolq, csqa, obqa, arc.
    #[arg(long, value_enum, default_value_t = TaskFormat::Auto)]
    pub task_format: TaskFormat,
    /// Scoring: letter (next-token letter probabilities), cloze (option log-likelihoods) or both.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    pub mode: Mode,
    /// Wrap the prompt in the model's chat template (user turn + assistant opening).
    #[arg(long)]
    pub chat_template: bool,
    /// Temperature dividing the logits (letter) or summed log-probs (cloze) before the softmax
    /// over options.
    #[arg(long, default_value_t = firstkd::Temperature::ONE)]
    pub temperature: firstkd::Temperature,
    /// Evaluate only the first N items.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Cloze: `shared` computes each question's prompt once with every option after it;
    /// `separate` runs one full sequence per option. The scores are the same.
    #[arg(long, value_enum, default_value_t = ClozeLayout::Shared)]
    pub cloze_layout: ClozeLayout,
    /// Print the reports (and per-item scores) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write a reliability diagram (SVG) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// cpu, or cuda[:N] (needs the `cuda` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Shared by `eval` and `compare`: evaluates the items of one task with a progress bar;
/// returns the result and the seconds it took.
pub(crate) fn evaluate_task(
    model: &Teacher,
    task: &Path,
    items: &[EvalItem],
    opts: &EvalOptions,
    label: &str,
) -> anyhow::Result<(EvalResult, f64)> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_string());
    let started = Instant::now();
    let result = evaluate(model, task, items, opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("evaluating {}", task.display()))?;
    bar.finish_and_clear();
    Ok((result, started.elapsed().as_secs_f64()))
}

pub(crate) fn load_model(path: &Path, device: &Device) -> anyhow::Result<Teacher> {
    Teacher::load(path, device).with_context(|| format!("loading model {}", path.display()))
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let format = args.task_format;
    let opts = EvalOptions {
        mode: args.mode,
        prompt: PromptOptions {
            chat_template: args.chat_template,
        },
        temperature: args.temperature,
        batch_tokens: args.batch_tokens,
        cloze_layout: args.cloze_layout,
        ..EvalOptions::default()
    };
    if let Some(plot) = &args.plot {
        anyhow::ensure!(
            plot.extension().is_some_and(|e| e == "svg"),
            "--plot {}: only SVG output is supported (use a .svg file name)",
            plot.display()
        );
    }
    // Read the task first so that bad input fails before the (slow) model load.
    let items = read_task(&args.task, format, args.limit)?;
    let model = load_model(&args.model, &super::device(&args.device)?)?;
    let (result, seconds) = evaluate_task(&model, &args.task, &items, &opts, "evaluating")?;
    let model_name = model.identity().file_name.clone();
    let task_name = args.task.display().to_string();
    if let Some(plot) = &args.plot {
        let svg = reliability_svg(&format!("{model_name} on {task_name}"), &result.reports);
        std::fs::write(plot, svg).with_context(|| format!("writing {}", plot.display()))?;
    }
    if args.json {
        let v = serde_json::json!({
            "model": model_name,
            "model_sha256": model.identity().sha256,
            "task": task_name,
            "task_format": format.as_str(),
            "chat_template": args.chat_template,
            "temperature": args.temperature,
            "n_items": result.items.len(),
            "tokens": result.tokens,
            "forward_passes": result.forward_passes,
            "seconds": seconds,
            "reports": result.reports,
            "items": result.items,
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(0);
    }
    writeln!(
        out,
        "model {model_name}, task {task_name}: {} items",
        result.items.len()
    )?;
    write_summary(out, &result.reports)?;
    for r in &result.reports {
        write_bins(out, r)?;
    }
    writeln!(
        out,
        "{} tokens in {} forward passes, {seconds:.1} s ({:.0} tokens/s); {}",
        result.tokens,
        result.forward_passes,
        result.tokens as f64 / seconds.max(1e-9),
        firstkd::runtime::peak_rss_line()
    )?;
    if let Some(plot) = &args.plot {
        writeln!(out, "reliability diagram: {}", plot.display())?;
    }
    Ok(0)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"))
}

fn write_summary(out: &mut dyn Write, reports: &[ModeReport]) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<7} {:>5} {:>7} {:>8} {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>11}",
        "mode",
        "n",
        "acc",
        "acc_norm",
        "ECE",
        "aECE",
        "MCE",
        "Brier(mc)",
        "NLL",
        "conf",
        "letter_mass"
    )?;
    for r in reports {
        let c = &r.calibration;
        writeln!(
            out,
            "{:<7} {:>5} {:>7.4} {:>8} {:>7.4} {:>7} {:>7.4} {:>9.4} {:>7} {:>7.4} {:>11}",
            r.mode,
            r.n,
            r.accuracy,
            opt(r.acc_norm),
            c.ece,
            opt(c.adaptive_ece),
            c.mce,
            r.brier_multiclass,
            opt(c.nll),
            c.mean_confidence,
            opt(r.mean_letter_mass)
        )?;
    }
    Ok(())
}

fn write_bins(out: &mut dyn Write, r: &ModeReport) -> anyhow::Result<()> {
    writeln!(out, "reliability ({}):", r.mode)?;
    writeln!(
        out,
        "  {:<13} {:>6} {:>8} {:>8} {:>8}",
        "bin", "count", "conf", "acc", "gap"
    )?;
    for b in r.calibration.bins.iter().filter(|b| b.count > 0) {
        writeln!(
            out,
            "  [{:.3}, {:.3}) {:>6} {:>8.4} {:>8.4} {:>8.4}",
            b.lower, b.upper, b.count, b.mean_confidence, b.accuracy, b.gap
        )?;
    }
    Ok(())
}
