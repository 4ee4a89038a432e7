//! The results table: one row per metric, one column per target, each cell the absolute
//! value and its ratio to nginx's.

use std::future::Future;
use std::path::Path;

use crate::load::{Metric, Outcome, Unit};
use crate::proxies::{Binaries, Target};

enum Cell {
    Empty,
    /// A value; `flagged` when some connections failed while measuring it.
    Value {
        value: f64,
        flagged: bool,
    },
    Error,
}

struct Row {
    metric: Metric,
    cells: Vec<Cell>,
}

pub struct Results {
    targets: Vec<Target>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Results {
    pub fn new(targets: &[Target]) -> Results {
        Results { targets: targets.to_vec(), rows: Vec::new(), notes: Vec::new() }
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Files what `scenario` gave for `target`: a value per metric, or an error for all of them.
    pub fn record(&mut self, scenario: &str, metrics: Vec<Metric>, target: Target, outcome: &anyhow::Result<Outcome>) {
        let column = self.targets.iter().position(|t| *t == target).expect("target has a column");
        let flagged = match outcome {
            Ok(Outcome { trouble: Some(trouble), .. }) => {
                self.notes.push(format!("* {target}, {scenario}: {trouble}"));
                true
            }
            Ok(_) => false,
            Err(e) => {
                self.notes.push(format!("{target}, {scenario}: error: {e:#}"));
                false
            }
        };
        for (i, metric) in metrics.into_iter().enumerate() {
            let row = match self.rows.iter().position(|r| r.metric.label == metric.label) {
                Some(row) => row,
                None => {
                    let cells = self.targets.iter().map(|_| Cell::Empty).collect();
                    self.rows.push(Row { metric, cells });
                    self.rows.len() - 1
                }
            };
            self.rows[row].cells[column] = match outcome {
                Ok(o) => Cell::Value { value: o.values[i], flagged },
                Err(_) => Cell::Error,
            };
        }
    }

    /// The Markdown table, preceded by `header` and followed by the notes.
    pub fn render(&self, header: &str) -> String {
        let column_of = |target: Target| self.targets.iter().position(|t| *t == target);
        let has_baseline = self.targets.iter().any(|t| column_of(t.baseline()).is_some());
        let mut out = format!("{header}\n| scenario |");
        for t in &self.targets {
            out.push_str(&format!(" {t} |"));
        }
        out.push_str("\n|---|");
        out.push_str(&"---:|".repeat(self.targets.len()));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&format!("| {} |", row.metric.label));
            for (cell, target) in row.cells.iter().zip(&self.targets) {
                // Each column against nginx over the same protocol (nginx-tls for -tls ones).
                let base = column_of(target.baseline()).and_then(|n| match row.cells[n] {
                    Cell::Value { value, .. } if value > 0.0 => Some(value),
                    _ => None,
                });
                out.push_str(&format!(" {} |", format_cell(cell, row.metric.unit, base)));
            }
            out.push('\n');
        }
        if has_baseline {
            out.push_str(
                "\nRatios are value ÷ nginx (÷ nginx-tls for the -tls columns): above 1 is better for rates, \
                 worse for latency and memory.\n",
            );
        }
        for note in &self.notes {
            out.push_str(&format!("\n- {note}"));
        }
        out.push('\n');
        out
    }
}

fn format_cell(cell: &Cell, unit: Unit, base: Option<f64>) -> String {
    match cell {
        Cell::Empty => "—".into(),
        Cell::Error => "error".into(),
        Cell::Value { value, flagged } => {
            let number = match unit {
                // Small CPU costs per message need the decimal to be told apart.
                Unit::Micros if *value < 100.0 => format!("{value:.1}"),
                Unit::Rate | Unit::Micros => thousands(*value),
                Unit::KiB => format!("{value:.1}"),
            };
            let ratio = base.map(|b| format!(" ({:.2}×)", value / b)).unwrap_or_default();
            let flag = if *flagged { " *" } else { "" };
            format!("{number}{ratio}{flag}")
        }
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < -0.5 {
        format!("-{out}")
    } else {
        out
    }
}

/// Measures every target `rounds` times, a round over all targets before the next, so a
/// busy spell on the machine hits one round of every column rather than every round of one.
/// Each cell gets a fresh directory under `dir`, and its values are logged as it ends.
/// Returns each target's outcomes, in `targets`' order.
pub async fn rounds_over<F, Fut>(
    what: &str,
    targets: &[Target],
    rounds: u32,
    dir: &Path,
    mut measure: F,
) -> anyhow::Result<Vec<Vec<anyhow::Result<Outcome>>>>
where
    F: FnMut(Target, std::path::PathBuf) -> Fut,
    Fut: Future<Output = anyhow::Result<Outcome>>,
{
    let mut outcomes: Vec<Vec<anyhow::Result<Outcome>>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (&target, rounds) in targets.iter().zip(&mut outcomes) {
            eprint!("{round} {target:>22} {what} ");
            let cell = dir.join(format!("{target}-{round}"));
            std::fs::create_dir_all(&cell)?;
            let outcome = measure(target, cell).await;
            match &outcome {
                Ok(o) => eprintln!("{}", o.values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join("  ")),
                Err(e) => eprintln!("error: {e:#}"),
            }
            rounds.push(outcome);
        }
    }
    Ok(outcomes)
}

impl Results {
    /// Prints the table under `## title`, with the machine and the proxies' versions, and
    /// writes it to `out` as well if given.
    pub fn publish(&self, title: &str, bins: &Binaries, targets: &[Target], out: Option<&Path>) -> anyhow::Result<()> {
        let header = format!(
            "## {title}\n\n{}\n\nProxies: {}; each in front of two echo-backend processes.\n",
            crate::machine::describe(),
            bins.versions(targets).join("; ")
        );
        let table = self.render(&header);
        println!("{table}");
        if let Some(out) = out {
            std::fs::write(out, &table)?;
        }
        Ok(())
    }
}
