//! What changed between two configs: connectors, users, routes, accepted
//! domains, balancer listeners and backends added, removed or changed, and
//! the settings that are one of a kind. `ferry config diff` prints it; a
//! node reloading its config will report the same summary. [`emptied`]
//! names a change that would empty what serves mail (a node's reload and
//! the control plane's Apply both refuse it).

use std::fmt;

use crate::model::ClusterConfig;
use crate::routes::Route;

/// How one item differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    Changed,
}

/// One item that differs, e.g. `connector "Client Frontend"` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: ChangeKind,
    /// The kind of item: `connector`, `user`, `route`, `accepted domain`,
    /// `balancer listener`, `balancer backend`, or a setting's name.
    pub item: &'static str,
    /// Which one: a name, a route's domains; empty for a setting.
    pub name: String,
}

impl fmt::Display for Change {
    /// `+ connector "X"`, `- user "y"`, `~ delivery settings`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.kind {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Changed => '~',
        };
        match self.name.is_empty() {
            true => write!(f, "{sign} {}", self.item),
            false => write!(f, "{sign} {} \"{}\"", self.item, self.name),
        }
    }
}

/// Every difference from `old` to `new`, items in the order of `new`
/// (removed ones after), kinds in the file's order.
pub fn changes(old: &ClusterConfig, new: &ClusterConfig) -> Vec<Change> {
    let mut out = Vec::new();
    let domains = |c: &ClusterConfig| {
        c.accepted_domains
            .iter()
            .map(|d| {
                let name = match d.subdomains {
                    true => format!("*.{}", d.domain),
                    false => d.domain.clone(),
                };
                (name, d.clone())
            })
            .collect::<Vec<_>>()
    };
    keyed(&mut out, "accepted domain", &domains(old), &domains(new));
    setting(
        &mut out,
        "trusted_proxies",
        &old.trusted_proxies,
        &new.trusted_proxies,
    );
    setting(&mut out, "postmaster", &old.postmaster, &new.postmaster);
    let connectors = |c: &ClusterConfig| {
        c.connectors
            .iter()
            .map(|k| (k.name.clone(), (**k).clone()))
            .collect::<Vec<_>>()
    };
    keyed(&mut out, "connector", &connectors(old), &connectors(new));
    let users = |c: &ClusterConfig| {
        c.users
            .values()
            .map(|u| (u.name.clone(), (**u).clone()))
            .collect::<Vec<_>>()
    };
    keyed(&mut out, "user", &users(old), &users(new));
    let routes = |c: &ClusterConfig| {
        c.routes
            .iter()
            .map(|r| (route_name(r), r.clone()))
            .collect::<Vec<_>>()
    };
    keyed(&mut out, "route", &routes(old), &routes(new));
    setting(&mut out, "delivery settings", &old.delivery, &new.delivery);
    setting(
        &mut out,
        "spool settings",
        &old.min_free_space,
        &new.min_free_space,
    );
    setting(&mut out, "auth settings", &old.auth, &new.auth);
    match (&old.balancer, &new.balancer) {
        (None, None) => {}
        (None, Some(_)) => out.push(change(ChangeKind::Added, "balancer section", "")),
        (Some(_), None) => out.push(change(ChangeKind::Removed, "balancer section", "")),
        (Some(a), Some(b)) => {
            let listeners = |l: &[crate::BalancerListener]| {
                l.iter()
                    .map(|x| (x.name.clone(), x.clone()))
                    .collect::<Vec<_>>()
            };
            keyed(
                &mut out,
                "balancer listener",
                &listeners(&a.listeners),
                &listeners(&b.listeners),
            );
            let backends = |l: &[crate::Backend]| {
                l.iter()
                    .map(|x| (x.name.clone(), x.clone()))
                    .collect::<Vec<_>>()
            };
            keyed(
                &mut out,
                "balancer backend",
                &backends(&a.backends),
                &backends(&b.backends),
            );
            let rest = |c: &crate::BalancerConfig| {
                (
                    c.access.clone(),
                    c.max_connections,
                    c.max_connections_per_source,
                    c.handoff_timeout,
                    c.idle_timeout,
                    c.probe,
                    c.source,
                )
            };
            setting(&mut out, "balancer settings", &rest(a), &rest(b));
        }
    }
    out
}

/// What a new config would empty that the one in service has: all
/// connectors (every SMTP port closes), all routes (accepted mail goes
/// nowhere and bounces), all balancer backends. Most likely an empty or
/// cut-short file (an editor's save caught half-way), so a node's reload
/// refuses it, and the control plane refuses such a change unless forced:
/// both call this one function.
pub fn emptied(old: &ClusterConfig, new: &ClusterConfig) -> Vec<String> {
    emptied_with_pool(old, new, 0)
}

/// As [`emptied`], for a cluster whose balancers also take backends from
/// the control plane's node registry: with `pool` workers in rotation
/// there, a config without static backends empties no balancer.
pub fn emptied_with_pool(old: &ClusterConfig, new: &ClusterConfig, pool: usize) -> Vec<String> {
    const WHY: &str = "an empty or cut-short file? The config in service keeps serving";
    let mut out = Vec::new();
    if !old.connectors.is_empty() && new.connectors.is_empty() {
        out.push(format!(
            "the new config has no connectors: every SMTP port would close ({WHY})"
        ));
    }
    if !old.routes.is_empty() && new.routes.is_empty() {
        out.push(format!(
            "the new config has no routes: accepted mail would be delivered nowhere ({WHY})"
        ));
    }
    let backends = |c: &ClusterConfig| c.balancer.as_ref().map_or(0, |b| b.backends.len());
    // A file cut before its [balancer] section counts too: every node
    // refuses it alike, rather than the workers taking it and the
    // balancers not.
    let from_pool = pool > 0 && new.balancer.is_some();
    if backends(old) > 0 && backends(new) == 0 && !from_pool {
        out.push(format!(
            "the new config has no balancer backends: a balancer would answer every client 421 ({WHY})"
        ));
    }
    out
}

/// A route is named by its domain patterns.
fn route_name(r: &Route) -> String {
    r.domains
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn change(kind: ChangeKind, item: &'static str, name: &str) -> Change {
    Change {
        kind,
        item,
        name: name.to_string(),
    }
}

fn keyed<T: PartialEq>(
    out: &mut Vec<Change>,
    item: &'static str,
    old: &[(String, T)],
    new: &[(String, T)],
) {
    for (name, value) in new {
        match old.iter().find(|(n, _)| n == name) {
            None => out.push(change(ChangeKind::Added, item, name)),
            Some((_, before)) if before != value => {
                out.push(change(ChangeKind::Changed, item, name))
            }
            Some(_) => {}
        }
    }
    for (name, _) in old {
        if !new.iter().any(|(n, _)| n == name) {
            out.push(change(ChangeKind::Removed, item, name));
        }
    }
}

fn setting<T: PartialEq>(out: &mut Vec<Change>, item: &'static str, old: &T, new: &T) {
    if old != new {
        out.push(change(ChangeKind::Changed, item, ""));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::path::Path;

    use super::*;

    const BASE: &str = r#"
accepted_domains = [{ domain = "example.test", kind = "authoritative" }]

[[connectors]]
name = "Default"
port = 25
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
banner = "hello"

[[connectors]]
name = "Gone"
port = 26
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]

[[routes]]
domains = ["example.test", "*.example.test"]
type = "directory"
path = "mail"

[balancer]
allow = ["127.0.0.0/8"]

[[balancer.listeners]]
name = "smtp"
port = 25

[[balancer.backends]]
name = "w1"
address = "127.0.0.11"
"#;

    fn parse(text: &str) -> ClusterConfig {
        ClusterConfig::parse("t.toml", text, Path::new(".")).unwrap()
    }

    #[test]
    fn names_every_item_added_removed_or_changed() {
        let old = parse(BASE);
        assert_eq!(changes(&old, &parse(BASE)), []);
        let new_text = BASE
            .replace("banner = \"hello\"", "banner = \"welcome\"")
            .replace("name = \"Gone\"\nport = 26", "name = \"New\"\nport = 27")
            .replace("path = \"mail\"", "path = \"mail2\"")
            .replace("allow = [\"127.0.0.0/8\"]", "allow = [\"10.0.0.0/8\"]")
            + "\n[[balancer.backends]]\nname = \"w2\"\naddress = \"127.0.0.12\"\n";
        let lines: Vec<String> = changes(&old, &parse(&new_text))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "~ connector \"Default\"",
                "+ connector \"New\"",
                "- connector \"Gone\"",
                "~ route \"example.test, *.example.test\"",
                "+ balancer backend \"w2\"",
                "~ balancer settings",
            ]
        );
    }

    #[test]
    fn a_changed_auth_section_is_named() {
        let new = parse(&format!("{BASE}\n[auth]\ncache_ttl = \"1m\"\n"));
        let lines: Vec<String> = changes(&parse(BASE), &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(lines, ["~ auth settings"]);
    }

    const EXAMPLE: &str = include_str!("../../../deploy/examples/ferry.toml");

    #[test]
    fn an_empty_or_cut_short_file_is_refused_but_an_ordinary_edit_is_not() {
        let full = parse(EXAMPLE);
        let edited = parse(&EXAMPLE.replace("Ferry Default Frontend ready", "Edited ready"));
        assert!(emptied(&full, &edited).is_empty());
        let empty = emptied(&full, &parse(""));
        assert_eq!(empty.len(), 3, "{empty:?}");
        assert!(empty[0].starts_with("the new config has no connectors"));
        assert!(empty[1].starts_with("the new config has no routes"));
        assert!(empty[2].starts_with("the new config has no balancer backends"));
        // Cut before its [balancer] section: refused by every node alike.
        let cut = EXAMPLE.find("\n[balancer]").unwrap();
        let no_balancer = emptied(&full, &parse(&EXAMPLE[..cut]));
        assert_eq!(no_balancer.len(), 1, "{no_balancer:?}");
        assert!(no_balancer[0].starts_with("the new config has no balancer backends"));
        // A node started on a config without them may get them or not.
        assert!(emptied(&parse(""), &full).is_empty());
        // With workers in the registry's pool, dropping the static
        // backends empties no balancer; dropping the section still does.
        let backends = EXAMPLE.find("[[balancer.backends]]").unwrap();
        let pooled = parse(&EXAMPLE[..backends]);
        assert!(pooled.balancer.as_ref().unwrap().backends.is_empty());
        assert_eq!(emptied(&full, &pooled).len(), 1);
        assert!(emptied_with_pool(&full, &pooled, 2).is_empty());
        assert_eq!(
            emptied_with_pool(&full, &parse(&EXAMPLE[..cut]), 2).len(),
            1
        );
    }
}
