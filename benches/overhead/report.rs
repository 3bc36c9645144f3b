//! The report: rows and targets, printed as a table and as Markdown.

#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) section: &'static str,
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) note: String,
}

#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) what: String,
    pub(crate) measured: String,
    pub(crate) pass: bool,
}

pub(crate) fn thousands(n: f64) -> String {
    if !n.is_finite() {
        return "n/a".to_owned();
    }
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn per_s(n: f64) -> String {
    format!("{}/s", thousands(n))
}

/// A table printed as Markdown after the rows.
#[derive(Debug)]
pub(crate) struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) targets: Vec<Target>,
    pub(crate) tables: Vec<Table>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        value: String,
        note: String,
    ) {
        self.rows.push(Row {
            section,
            name: name.into(),
            value,
            note,
        });
    }

    pub(crate) fn target(&mut self, what: impl Into<String>, measured: String, pass: bool) {
        self.targets.push(Target {
            what: what.into(),
            measured,
            pass,
        });
    }

    /// A table of its own, printed (as Markdown) after the rows.
    pub(crate) fn table(&mut self, title: String, header: Vec<String>, rows: Vec<Vec<String>>) {
        self.tables.push(Table {
            title,
            header,
            rows,
        });
    }

    pub(crate) fn print(&self) {
        let width = |f: fn(&Row) -> usize, header: &str| {
            self.rows.iter().map(f).max().unwrap_or(0).max(header.len())
        };
        let ws = width(|r| r.section.len(), "section");
        let wn = width(|r| r.name.chars().count(), "measurement");
        let wv = width(|r| r.value.len(), "result");
        println!();
        println!(
            "{:<ws$}  {:<wn$}  {:>wv$}  note",
            "section", "measurement", "result"
        );
        println!("{}", "-".repeat(ws + wn + wv + 6 + 40));
        for r in &self.rows {
            println!(
                "{:<ws$}  {:<wn$}  {:>wv$}  {}",
                r.section, r.name, r.value, r.note
            );
        }
        println!();
        for t in &self.targets {
            println!(
                "TARGET {}: {} {}",
                t.what,
                t.measured,
                if t.pass { "PASS" } else { "MISS" }
            );
        }
        println!();
        println!("Markdown (for BENCHMARKS.md):");
        println!();
        println!("| section | measurement | result | note |");
        println!("|---|---|---:|---|");
        for r in &self.rows {
            println!(
                "| {} | {} | {} | {} |",
                r.section,
                r.name.replace('|', "\\|"),
                r.value,
                r.note.replace('|', "\\|")
            );
        }
        println!();
        println!("| target | measured | |");
        println!("|---|---:|---|");
        for t in &self.targets {
            println!(
                "| {} | {} | {} |",
                t.what.replace('|', "\\|"),
                t.measured,
                if t.pass { "PASS" } else { "MISS" }
            );
        }
        for table in &self.tables {
            println!();
            println!("{}:", table.title);
            println!();
            let cells = |row: &[String]| {
                let escaped: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
                format!("| {} |", escaped.join(" | "))
            };
            println!("{}", cells(&table.header));
            println!("|{}", "---|".repeat(table.header.len()));
            for row in &table.rows {
                println!("{}", cells(row));
            }
        }
    }
}
