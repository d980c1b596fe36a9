//! A diagnosis as people and programs read it: one verdict per check with its evidence and fix,
//! rendered as lines for a terminal or as the JSON `/doctor` and `doctor --output json` serve.

use std::fmt::Write;

use serde::Serialize;

/// How bad a check's finding is; a report is as bad as its worst check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warning,
    Critical,
}

impl Verdict {
    /// `doctor`'s exit code for a report with this verdict: 0, 1 or 2.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::Warning => 1,
            Verdict::Critical => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Critical => "critical",
        }
    }

    /// ANSI colour: green, yellow, red.
    fn colour(self) -> &'static str {
        match self {
            Verdict::Ok => "\x1b[32m",
            Verdict::Warning => "\x1b[33m",
            Verdict::Critical => "\x1b[31m",
        }
    }
}

/// One finding: what was checked, how it stands, why, and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `members`, `space`, `certificates`, `auth` or `performance`.
    pub group: &'static str,
    /// Stable within its group, for scripts.
    pub name: &'static str,
    pub verdict: Verdict,
    /// One line.
    pub summary: String,
    /// What the verdict rests on, one fact per line.
    pub evidence: Vec<String>,
    /// The exact next step, when something is wrong.
    pub fix: Option<String>,
}

impl Check {
    /// A check that passed.
    pub fn ok(group: &'static str, name: &'static str, summary: impl Into<String>) -> Check {
        Check { group, name, verdict: Verdict::Ok, summary: summary.into(), evidence: Vec::new(), fix: None }
    }

    /// A finding with its fix.
    pub fn found(
        group: &'static str,
        name: &'static str,
        verdict: Verdict,
        summary: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check { group, name, verdict, summary: summary.into(), evidence: Vec::new(), fix: Some(fix.into()) }
    }

    /// The same check with `evidence` added.
    pub fn with_evidence(mut self, evidence: Vec<String>) -> Check {
        self.evidence.extend(evidence);
        self
    }
}

/// A member as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberRow {
    pub name: String,
    /// Hex, as etcdctl prints it.
    pub id: String,
    pub endpoint: Option<String>,
    /// `leader`, `follower`, `learner` or `unknown` (not reachable).
    pub role: &'static str,
    pub reachable: bool,
    pub version: Option<String>,
    pub db_size: Option<i64>,
    pub db_size_in_use: Option<i64>,
    /// The quota the space checks used for this member.
    pub quota: i64,
    pub raft_index: Option<u64>,
    pub raft_applied_index: Option<u64>,
    pub status_ms: Option<f64>,
    /// Active alarms on this member (`NOSPACE`, `CORRUPT`).
    pub alarms: Vec<String>,
    pub error: Option<String>,
}

/// A certificate and its days left.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    /// What uses it: `listener`, `upstream client`, `member m0`, ...
    pub source: String,
    pub path: String,
    pub subject: String,
    pub not_after: String,
    pub days_left: i64,
}

/// Cluster-wide facts.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    pub revision: Option<i64>,
    /// Oldest readable revision; 0 when nothing was ever compacted.
    pub compact_revision: Option<i64>,
    /// Hex id of the leader, when one is known.
    pub leader: Option<String>,
}

/// One diagnosis.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    /// `YYYY-MM-DD HH:MM:SS UTC`.
    pub checked_at: String,
    pub cluster: ClusterRow,
    pub members: Vec<MemberRow>,
    pub certificates: Vec<CertRow>,
    pub checks: Vec<Check>,
}

impl Report {
    /// The report from its parts; the verdict is the worst check's.
    pub fn new(cluster: ClusterRow, members: Vec<MemberRow>, certificates: Vec<CertRow>, checks: Vec<Check>) -> Report {
        let verdict = checks.iter().map(|c| c.verdict).max().unwrap_or(Verdict::Ok);
        Report {
            verdict,
            checked_at: crate::tls::format_unix(crate::tls::now_unix()),
            cluster,
            members,
            certificates,
            checks,
        }
    }

    /// The JSON of `/doctor` and `--output json`.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|error| format!("{{\"error\":\"{error}\"}}"))
    }

    /// Lines for people: a headline, one line per check, its evidence and fix under it when
    /// something is wrong; `colour` for a terminal.
    pub fn to_text(&self, colour: bool) -> String {
        let paint = |verdict: Verdict, text: &str| {
            if colour {
                format!("{}{text}\x1b[0m", verdict.colour())
            } else {
                text.to_owned()
            }
        };
        let count = |verdict: Verdict| self.checks.iter().filter(|c| c.verdict == verdict).count();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cluster: {} ({} critical, {} warning, {} ok)",
            paint(self.verdict, self.verdict.label()),
            count(Verdict::Critical),
            count(Verdict::Warning),
            count(Verdict::Ok)
        );
        for check in &self.checks {
            let label = format!("{:<8}", check.verdict.label());
            let _ = writeln!(
                out,
                "{} {:<26} {}",
                paint(check.verdict, &label),
                format!("{}/{}", check.group, check.name),
                check.summary
            );
            if check.verdict != Verdict::Ok {
                for line in &check.evidence {
                    let _ = writeln!(out, "{:<36}- {line}", "");
                }
            }
            if let Some(fix) = check.fix.as_ref().filter(|_| check.verdict != Verdict::Ok) {
                let _ = writeln!(out, "{:<36}fix: {fix}", "");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> Report {
        Report::new(ClusterRow { revision: Some(5), compact_revision: Some(0), leader: None }, vec![], vec![], checks)
    }

    #[test]
    fn the_worst_check_decides_the_verdict_and_exit_code() {
        let ok = Check::ok("members", "reachable", "3 of 3 members answer");
        let warning = Check::found("members", "learners", Verdict::Warning, "a learner", "promote it");
        let critical = Check::found("space", "alarms", Verdict::Critical, "NOSPACE", "recover-space");
        assert_eq!(report(vec![ok.clone()]).verdict.exit_code(), 0);
        assert_eq!(report(vec![ok.clone(), warning.clone()]).verdict.exit_code(), 1);
        assert_eq!(report(vec![critical, ok, warning]).verdict.exit_code(), 2);
        assert_eq!(report(vec![]).verdict, Verdict::Ok);
    }

    #[test]
    fn text_shows_evidence_and_fix_only_for_findings() {
        let ok = Check::ok("auth", "auth", "auth is off").with_evidence(vec!["hidden".to_owned()]);
        let critical = Check::found("space", "alarms", Verdict::Critical, "NOSPACE on m0", "run recover-space")
            .with_evidence(vec!["m0: NOSPACE".to_owned()]);
        let text = report(vec![ok, critical]).to_text(false);
        assert_eq!(
            text,
            "cluster: critical (1 critical, 0 warning, 1 ok)\n\
             ok       auth/auth                  auth is off\n\
             critical space/alarms               NOSPACE on m0\n\
             \x20                                   - m0: NOSPACE\n\
             \x20                                   fix: run recover-space\n"
        );
    }

    #[test]
    fn json_names_verdicts_in_lowercase() {
        let json = report(vec![Check::found("space", "history", Verdict::Warning, "s", "f")]).to_json();
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(value["verdict"], "warning");
        assert_eq!(value["checks"][0]["group"], "space");
        assert_eq!(value["checks"][0]["fix"], "f");
    }
}
