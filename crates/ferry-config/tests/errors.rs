//! Bad config files: every error reported at once, with its place.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;

use ferry_config::ClusterConfig;

fn errors(text: &str) -> Vec<String> {
    match ClusterConfig::parse("bad.toml", text, Path::new(".")) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e.errors().iter().map(|l| l.to_string()).collect(),
    }
}

#[test]
fn every_error_is_reported_with_line_and_column() {
    let text = r#"accepted_domains = [{ domain = "bad domain", kind = "authoritative" }]

[[connectors]]
name = "A"
port = 25
remote_ranges = ["10.0.0.0/33", "0.0.0.0/0"]
permissions = ["anonymous", "everyone"]
limits = { max_message_size = "lots", command_timeout = "soon" }
"#;
    let errs = errors(text);
    assert_eq!(
        errs,
        [
            "1:32: 'bad domain' is not a domain name (or *.domain)",
            "6:18: '10.0.0.0/33' is not an IP address or CIDR range",
            "7:29: permission 'everyone' is not 'anonymous', 'accept_any_recipient' or 'users'",
            "8:31: a size is a positive number of octets or a string such as \"36MB\"",
            "8:57: 'soon' is not a duration such as \"30s\" or \"5m\"",
        ]
    );
}

#[test]
fn equal_ranges_on_one_port_are_refused() {
    let text = r#"
[[connectors]]
name = "A"
port = 25
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]

[[connectors]]
name = "B"
port = 25
remote_ranges = ["192.0.2.0/24", "10.0.0.0/8"]
permissions = ["anonymous"]

[[connectors]]
name = "C, other port"
port = 587
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]
"#;
    assert_eq!(
        errors(text),
        [
            "11:34: remote range 10.0.0.0/8 on port 25 is also claimed by connector 'A': \
          connectors sharing a port need distinct ranges"
        ]
    );
}

#[test]
fn mapped_ipv6_range_equals_its_ipv4_range() {
    let text = r#"
[[connectors]]
name = "A"
port = 25
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]

[[connectors]]
name = "B"
port = 25
remote_ranges = ["::ffff:10.0.0.0/104"]
permissions = ["anonymous"]
"#;
    assert_eq!(errors(text).len(), 1);
}

#[test]
fn unknown_keys_and_syntax_errors_are_located() {
    assert_eq!(
        errors("[[connectors]]\nname = \"A\"\nport = 25\nremote_ranges = [\"10.0.0.0/8\"]\npermissions = [\"anonymous\"]\nprots = 1\n"),
        ["6:1: unknown key `prots` in [[connectors]]; expected one of `name`, `port`, `local_address`, `remote_ranges`, `permissions`, `auth`, `tls`, `banner`, `limits`, `protocol_log`, `add_missing_headers`, `backlog`"]
    );
    assert_eq!(errors("x = [").len(), 1);
    // Every syntax error, not only the first.
    assert_eq!(
        errors("name = \"A\nport = 25\nbanner = }\n"),
        [
            "1:10: invalid basic string, expected `\"`",
            "3:10: missing inline table opening, expected `{`",
        ]
    );
}

/// A setting Ferry no longer has is refused with why and what to do,
/// not as an unknown key (a config that was valid before says so).
#[test]
fn the_removed_data_memory_budget_is_refused_with_a_reason() {
    let text = "[spool]\nmin_free_space = \"1MB\"\nmax_data_in_memory = \"1GB\"\n";
    assert_eq!(
        errors(text),
        [
            "3:22: `max_data_in_memory` in [spool] is no longer a setting: a message is \
             written to the spool as it arrives, so a session holds a chunk of it (256 KiB), \
             never the whole message; remove it"
        ]
    );
}

/// Unknown keys and wrong types used to end the reading, hiding every
/// other mistake until they were fixed: six mistakes of six kinds, one pass.
#[test]
fn six_mistakes_of_different_kinds_are_reported_in_one_pass() {
    let text = r#"trusted_proxys = ["127.0.0.1"]

[[connectors]]
name = "Default"
port = "2525"
remote_ranges = ["0.0.0.0/0", "10.0.0.0/33"]
permissions = ["anonymous"]

[[routes]]
domains = ["*"]
next_hops = ["relay.example.test"]

[delivery]
retry_interval = "soon"

[balancer]
allow = ["0.0.0.0/0"]

[[balancer.listeners]]
name = "smtp"
port = 70000
"#;
    assert_eq!(
        errors(text),
        [
            "1:1: unknown key `trusted_proxys` in the top level; expected one of \
             `accepted_domains`, `trusted_proxies`, `connectors`, `users`, `routes`, \
             `delivery`, `spool`, `balancer`, `postmaster`, `auth`",
            "5:8: port: invalid type: string \"2525\", expected u16",
            "6:31: '10.0.0.0/33' is not an IP address or CIDR range",
            "9:1: [[routes]] needs the key `type`",
            "14:18: 'soon' is not a duration such as \"30s\" or \"5m\"",
            "21:8: port: invalid value: integer `70000`, expected u16",
        ]
    );
}

/// Nested tables name their place and keep reading after a bad key.
#[test]
fn nested_tables_report_unknown_keys_and_types_together() {
    let text = r#"
[[connectors]]
name = "A"
port = 25
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous"]
limits = { max_recipients = "many", max_size = 1 }

[balancer]
allow = ["0.0.0.0/0"]
listeners = [{ name = "smtp", port = 25 }]
probe = { rise = -1, fal = 2 }
"#;
    assert_eq!(
        errors(text),
        [
            "7:29: max_recipients: invalid type: string \"many\", expected u32",
            "7:37: unknown key `max_size` in [connectors.limits]; expected one of \
             `max_message_size`, `max_header_size`, `max_recipients`, `max_connections`, \
             `max_connections_per_source`, `connection_timeout`, `command_timeout`, \
             `data_timeout`, `max_protocol_errors`, `tarpit`, `max_hop_count`",
            "12:18: rise: invalid value: integer `-1`, expected u32",
            "12:22: unknown key `fal` in [balancer.probe]; expected one of `interval`, \
             `timeout`, `rise`, `fall`",
        ]
    );
}

#[test]
fn inconsistent_auth_settings() {
    let text = r#"
[[connectors]]
name = "A"
port = 587
remote_ranges = ["0.0.0.0/0"]
permissions = ["users"]
auth = ["basic_auth_require_tls"]

[[users]]
name = "u"
password_hash = "plaintext"
allowed_senders = []
"#;
    let errs = errors(text);
    assert!(
        errs.iter().any(|e| e.contains("needs auth 'tls'")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("not an argon2 PHC string")),
        "{errs:?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("allowed_senders is empty")),
        "{errs:?}"
    );
}

#[test]
fn route_errors_name_their_place() {
    let text = r#"
[[routes]]
domains = ["*"]
type = "mx"
next_hops = ["relay.example.test"]

[[routes]]
domains = ["example.test"]
type = "smtp"
next_hops = ["relay.example.test"]
port = 2525

[[routes]]
domains = ["other.test"]
type = "dns"

[delivery]
dns_servers = ["127.0.0.1:5353", "resolver.example.test"]
"#;
    assert_eq!(
        errors(text),
        [
            "5:14: an mx route finds its next hops in DNS; drop next_hops",
            "11:8: port is for mx routes; give smtp next hops as host:port",
            "15:8: route type 'dns' is not 'smtp', 'mx' or 'directory'",
            "18:34: 'resolver.example.test' is not an IP address or IP:port",
        ]
    );
}

#[test]
fn a_ca_file_is_only_for_routes_that_verify_certificates() {
    let text = r#"
[[routes]]
domains = ["smarthost.test"]
type = "smtp"
next_hops = ["relay.example.test"]
verify_certificates = false
ca_file = "certs/ca.pem"

[[routes]]
domains = ["*"]
type = "mx"
ca_file = "certs/ca.pem"

[[routes]]
domains = ["example.test"]
type = "directory"
path = "mail"
ca_file = "certs/ca.pem"

[[routes]]
domains = ["plain.test"]
type = "smtp"
next_hops = ["relay.example.test"]
tls = "none"
ca_file = "certs/ca.pem"
"#;
    let why =
        "ca_file is trusted only where certificates are verified: set verify_certificates = true";
    assert_eq!(
        errors(text),
        [
            format!("7:11: {why}"),
            format!("12:11: {why}"),
            "18:11: ca_file is for smtp and mx routes".into(),
            "25:11: ca_file means nothing with tls = \"none\": remove one".into(),
        ]
    );
    let text = r#"
[[routes]]
domains = ["smarthost.test"]
type = "smtp"
next_hops = ["relay.example.test"]
ca_file = "certs/ca.pem"
"#;
    let config = ClusterConfig::parse("ok.toml", text, Path::new("/etc/ferry")).unwrap();
    let ferry_config::RouteAction::Smtp { ca_file, .. } = &config.routes[0].action else {
        panic!("{:?}", config.routes[0].action);
    };
    assert_eq!(
        ca_file.as_deref(),
        Some(Path::new("/etc/ferry/certs/ca.pem"))
    );
}

#[test]
fn mx_route_defaults() {
    let text = r#"
[[routes]]
domains = ["*"]
type = "mx"

[delivery]
dns_servers = ["127.0.0.1", "[::1]:5353"]
"#;
    let config = ClusterConfig::parse("ok.toml", text, Path::new(".")).unwrap();
    assert_eq!(
        config.routes[0].action,
        ferry_config::RouteAction::Mx {
            port: 25,
            tls: ferry_config::TlsPolicy::Opportunistic,
            verify_certificates: false,
            ca_file: None,
        }
    );
    assert_eq!(
        config.delivery.dns_servers,
        [
            "127.0.0.1:53".parse().unwrap(),
            "[::1]:5353".parse().unwrap()
        ]
    );
}

#[test]
fn balancer_source_is_an_address_of_the_backends_family() {
    let text = r#"trusted_proxies = ["127.0.0.2", "::1"]
[balancer]
allow = ["127.0.0.0/8"]
source = "balancer.local"
listeners = [{ name = "smtp", port = 25 }]
backends = [{ name = "w1", address = "127.0.0.11" }]
"#;
    assert_eq!(
        errors(text),
        ["4:10: 'balancer.local' is not an IP address"]
    );
    let text = text.replace("balancer.local", "::1");
    assert_eq!(
        errors(&text),
        ["4:10: source ::1 and backend 'w1' (127.0.0.11) are of different IP families"]
    );
    let text = text.replace("::1", "127.0.0.2");
    let config = ClusterConfig::parse("ok.toml", &text, Path::new(".")).unwrap();
    assert_eq!(
        config.balancer.unwrap().source,
        Some("127.0.0.2".parse().unwrap())
    );
}

/// Workers read a PROXY header only from `trusted_proxies`; a balancer
/// sending PROXY from a `source` outside them would have its headers read
/// as SMTP commands (`500 5.5.1`) and every client dropped.
#[test]
fn balancer_source_must_be_a_trusted_proxy_when_it_sends_proxy() {
    let text = r#"trusted_proxies = ["127.0.0.2/32", "not a range"]

[balancer]
allow = ["127.0.0.0/8"]
source = "127.0.0.3"

[[balancer.listeners]]
name = "smtp"
port = 25

[[balancer.listeners]]
name = "plain"
port = 26
proxy_protocol = false
"#;
    // With an unreadable range in the list, only that range is reported.
    assert_eq!(
        errors(text),
        ["1:36: 'not a range' is not an IP address or CIDR range"]
    );
    let text = text.replace(", \"not a range\"", "");
    assert_eq!(
        errors(&text),
        [
            "5:10: balancer source 127.0.0.3 is not in trusted_proxies: \
             the workers would refuse its PROXY headers"
        ]
    );
    // No trusted proxy at all is the same mistake.
    let bare = text.replace("trusted_proxies = [\"127.0.0.2/32\"]", "");
    assert_eq!(errors(&bare).len(), 1, "{:?}", errors(&bare));
    // Covered by a range (and as an IPv4-mapped address): accepted.
    for trusted in ["127.0.0.0/8", "::ffff:127.0.0.3"] {
        let ok = text.replace("127.0.0.2/32", trusted);
        ClusterConfig::parse("ok.toml", &ok, Path::new(".")).unwrap();
    }
    // No listener sends PROXY: the workers read no header from it anyway.
    let ok = text.replace("port = 25\n", "port = 25\nproxy_protocol = false\n");
    ClusterConfig::parse("ok.toml", &ok, Path::new(".")).unwrap();
    // No source: the system picks the address, nothing to check here.
    let ok = text.replace("source = \"127.0.0.3\"\n", "");
    ClusterConfig::parse("ok.toml", &ok, Path::new(".")).unwrap();
}

#[test]
fn postmaster_must_be_a_mailbox_and_allowed_senders_addresses() {
    let text = r#"postmaster = "not an address"

[[users]]
name = "u"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$9sTbSlTio3Biev89thdrlKKiCaYsjjYVJxGAL3swxpQ"
allowed_senders = ["a b@example.test", "*@bad_domain", "\"odd user\"@example.test", "*@[192.0.2.1]"]
"#;
    assert_eq!(
        errors(text),
        [
            "1:14: postmaster 'not an address' is not an address",
            "6:20: 'a b@example.test' is not an address, *@domain or *",
            "6:40: '*@bad_domain' is not an address, *@domain or *",
        ]
    );
    let ok = "postmaster = \"\\\"mail admins\\\"@example.test\"\n";
    let config = ClusterConfig::parse("ok.toml", ok, Path::new(".")).unwrap();
    assert_eq!(
        config.postmaster.unwrap().to_string(),
        "\"mail admins\"@example.test"
    );
}

#[test]
fn duplicate_backends_and_empty_paths_are_refused() {
    let text = r#"[[routes]]
domains = ["*"]
type = "directory"
path = ""

[balancer]
allow = ["0.0.0.0/0"]

[[balancer.listeners]]
name = "smtp"
port = 0

[[balancer.backends]]
name = "a"
address = "127.0.0.11"

[[balancer.backends]]
name = "b"
address = "127.0.0.11"
"#;
    assert_eq!(
        errors(text),
        [
            "4:8: a directory route needs a path, not an empty one",
            "19:11: backend address 127.0.0.11 is listed twice",
        ]
    );
}

#[test]
fn auth_section_defaults_and_errors() {
    let c = ClusterConfig::parse("ok.toml", "", Path::new(".")).unwrap();
    let d = ferry_config::AuthConfig::default();
    assert_eq!(c.auth, d);
    assert_eq!(d.max_verifications, None);
    assert_eq!(d.cache_ttl, std::time::Duration::from_secs(600));
    assert_eq!(d.max_failures, 5);
    let c = ClusterConfig::parse(
        "ok.toml",
        "[auth]\nmax_verifications = 3\ncache_ttl = \"0s\"\nnegative_cache_ttl = \"0\"\nmax_failures = 0\nverification_wait = \"250ms\"\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.auth.max_verifications, Some(3));
    assert!(c.auth.cache_ttl.is_zero() && c.auth.negative_cache_ttl.is_zero());
    assert_eq!(c.auth.max_failures, 0);
    assert_eq!(c.auth.verification_wait.as_millis(), 250);
    let text = r#"[auth]
max_verifications = 0
verification_wait = "0s"
cache_ttl = "long"
cooling_off = 5
max_failure = 3
"#;
    assert_eq!(
        errors(text),
        [
            "2:21: max_verifications must be at least 1",
            "3:21: '0s': this must be more than zero",
            "4:13: 'long' is not a duration such as \"30s\" or \"5m\"",
            "5:15: cooling_off: invalid type: integer `5`, expected a string",
            "6:1: unknown key `max_failure` in [auth]; expected one of `max_verifications`, `verification_wait`, `cache_ttl`, `negative_cache_ttl`, `max_failures`, `failure_window`, `cooling_off`",
        ]
    );
}

#[test]
fn auth_values_that_could_overflow_or_exhaust_memory_are_refused() {
    // humantime takes these; "now + duration" would overflow an Instant.
    let text = r#"[auth]
max_verifications = 100000
verification_wait = "2days"
cache_ttl = "300000000000y"
negative_cache_ttl = "31days"
failure_window = "300000000000y"
cooling_off = "300000000000y"
max_failures = 4000000000
"#;
    assert_eq!(
        errors(text),
        [
            "2:21: max_verifications must be at most 1024",
            "3:21: '2days' is too long: at most 1 day",
            "4:13: '300000000000y' is too long: at most 30 days",
            "5:22: '31days' is too long: at most 30 days",
            "6:18: '300000000000y' is too long: at most 30 days",
            "7:15: '300000000000y' is too long: at most 30 days",
            "8:16: max_failures must be at most 1000",
        ]
    );
    // The bounds themselves are accepted.
    let c = ClusterConfig::parse(
        "ok.toml",
        "[auth]\nmax_verifications = 1024\nverification_wait = \"1day\"\ncache_ttl = \"30days\"\ncooling_off = \"30days\"\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.auth.max_verifications, Some(1024));
    assert_eq!(c.auth.cooling_off.as_secs(), 30 * 24 * 3600);
}

#[test]
fn a_password_hash_over_1_gib_or_without_output_is_refused() {
    let user = |hash: &str| {
        format!("[[users]]\nname = \"u\"\npassword_hash = \"{hash}\"\nallowed_senders = [\"*\"]\n")
    };
    let salt = "c2FsdHNhbHQ";
    let out = "9sTbSlTio3Biev89thdrlKKiCaYsjjYVJxGAL3swxpQ";
    // 4 GiB: every verification (and the decoy of unknown users) would
    // allocate it.
    assert_eq!(
        errors(&user(&format!(
            "$argon2id$v=19$m=4194304,t=1,p=1${salt}${out}"
        ))),
        ["3:17: password_hash's memory cost m=4194304 KiB is over 1048576 KiB (1 GiB)"]
    );
    assert_eq!(
        errors(&user(&format!("$argon2id$v=19$m=19456,t=2,p=1${salt}"))),
        ["3:17: password_hash has no salt or no hash output (make one with 'ferry user hash')"]
    );
    assert_eq!(
        errors(&user(&format!(
            "$argon2id$v=19$m=19456,t=0,p=1${salt}${out}"
        ))),
        ["3:17: password_hash has argon2 parameters argon2 refuses (m, t, p or the output length)"]
    );
    assert_eq!(
        errors(&user(&format!("$scrypt$ln=15,r=8,p=1${salt}${out}"))),
        ["3:17: password_hash is not an argon2 PHC string (make one with 'ferry user hash')"]
    );
    // A time cost that would hold a verification slot for tens of seconds.
    assert_eq!(
        errors(&user(&format!(
            "$argon2id$v=19$m=19456,t=3000,p=1${salt}${out}"
        ))),
        ["3:17: password_hash's time cost t=3000 is over 16 passes (each AUTH as this user would hold a verification slot that long)"]
    );
    assert_eq!(
        errors(&user(&format!(
            "$argon2id$v=19$m=19456,t=2,p=255${salt}${out}"
        ))),
        ["3:17: password_hash's parallelism p=255 is over 16 lanes"]
    );
    // 1 GiB, 16 passes and 16 lanes themselves are accepted.
    ClusterConfig::parse(
        "ok.toml",
        &user(&format!("$argon2id$v=19$m=1048576,t=16,p=16${salt}${out}")),
        Path::new("."),
    )
    .unwrap();
}

#[test]
fn backlogs_default_to_1024_and_out_of_range_ones_are_located() {
    let text = r#"
[[connectors]]
name = "A"
port = 25
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]
backlog = 0

[[connectors]]
name = "B"
port = 587
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]
backlog = 1000000

[balancer]
allow = ["0.0.0.0/0"]

[[balancer.listeners]]
name = "smtp"
port = 2525
backlog = -5

[[balancer.backends]]
name = "w"
address = "127.0.0.1"
"#;
    assert_eq!(
        errors(text),
        [
            "7:11: backlog 0 is not from 1 to 65535 connections",
            "14:11: backlog 1000000 is not from 1 to 65535 connections",
            "22:11: backlog -5 is not from 1 to 65535 connections",
        ]
    );

    // Unset: 1024 everywhere. Connectors sharing a port share its socket,
    // which takes the largest backlog one of them sets.
    let good = text
        .replace("backlog = 0\n", "")
        .replace("backlog = 1000000\n", "")
        .replace("backlog = -5\n", "");
    let c = ClusterConfig::parse("ok.toml", &good, Path::new(".")).unwrap();
    let ports: Vec<(u16, u32)> = c
        .listen_ports()
        .iter()
        .map(|p| (p.port, p.backlog))
        .collect();
    assert_eq!(ports, [(25, 1024), (587, 1024)]);
    assert_eq!(c.balancer.unwrap().listeners[0].backlog, 1024);
    let shared = r#"
[[connectors]]
name = "A"
port = 25
remote_ranges = ["10.0.0.0/8"]
permissions = ["anonymous"]

[[connectors]]
name = "B"
port = 25
remote_ranges = ["192.0.2.0/24"]
permissions = ["anonymous"]
backlog = 4096
"#;
    let c = ClusterConfig::parse("ok.toml", shared, Path::new(".")).unwrap();
    let ports: Vec<(u16, u32)> = c
        .listen_ports()
        .iter()
        .map(|p| (p.port, p.backlog))
        .collect();
    assert_eq!(ports, [(25, 4096)]);
}
