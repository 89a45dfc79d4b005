//! Self-tests of the user-mode Linux harness (tests/uml/): a job really runs in the UML kernel,
//! IPVS, ipset, netns, veth and iptables-legacy work there, exit codes and output come back,
//! /run stays private, a cargo-built binary runs inside, and a job that hangs or crashes the
//! kernel ends in an error with the console instead of hanging the suite or leaving processes.
//! Needs Debian's user-mode-linux: skips loudly without it, fails under CI=true.

mod uml;

use std::time::Duration;
use uml::{UmlError, UmlJob, run_in_uml};

fn run_ok(job: &UmlJob) -> uml::UmlResult {
    let result = run_in_uml(job).unwrap_or_else(|e| panic!("{e}"));
    result.assert_success();
    result
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host kernel release").trim().to_string()
}

#[test]
fn runs_in_the_uml_kernel_with_every_module_loaded() {
    if !uml::require_uml() {
        return;
    }
    let result = run_ok(&UmlJob::new(&["uname", "-r"]));
    eprintln!("uname -r in UML: {}", result.timings());
    let release = result.stdout.trim();
    assert_ne!(release, host_release(), "the job ran on the host kernel");
    assert!(
        std::path::Path::new("/usr/lib/uml/modules").join(release).is_dir(),
        "UML release {release:?} has no modules directory"
    );
    assert!(result.console.contains(&format!("Linux version {release}")), "console:\n{}", result.console);
    // Every default module exists in Debian's UML build: a failure here is a harness bug.
    assert_eq!(result.modules_failed, Vec::<(String, String)>::new(), "modules that did not load");
    assert_eq!(result.modules_loaded.len(), uml::DEFAULT_MODULES.len());
}

#[test]
fn ipvs_virtual_and_real_servers_can_be_added() {
    if !uml::require_uml() {
        return;
    }
    const SCRIPT: &str = "set -e
        ipvsadm -A -t 10.96.0.10:80 -s rr
        ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m
        ipvsadm -A -u [fd00:96::10]:53 -s mh
        ipvsadm -a -u [fd00:96::10]:53 -r [fd00:244::2]:5353 -m
        ipvsadm -Ln";
    let result = run_ok(&UmlJob::shell(SCRIPT));
    eprintln!("ipvsadm in UML: {}", result.timings());
    let lines: Vec<Vec<&str>> = result.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    let has = |want: &[&str]| lines.iter().any(|l| l.starts_with(want));
    assert!(has(&["TCP", "10.96.0.10:80", "rr"]), "no virtual server:\n{}", result.stdout);
    assert!(has(&["->", "10.244.1.2:8080", "Masq", "1"]), "no real server:\n{}", result.stdout);
    assert!(has(&["UDP", "[fd00:96::10]:53", "mh"]), "no IPv6 virtual server:\n{}", result.stdout);
    assert!(has(&["->", "[fd00:244::2]:5353", "Masq", "1"]), "no IPv6 real server:\n{}", result.stdout);
}

#[test]
fn exit_code_and_stderr_come_back() {
    if !uml::require_uml() {
        return;
    }
    let job = UmlJob::shell(r#"echo "out $KPX_GREETING"; echo oops >&2; exit 7"#).env("KPX_GREETING", "hello there");
    let result = run_in_uml(&job).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.exit_code, 7, "{result}");
    assert_eq!(result.stdout, "out hello there\n");
    assert_eq!(result.stderr, "oops\n");
    // A module that does not exist is reported; the others load all the same.
    let job = UmlJob::new(&["/nonexistent/kpx-binary"]).modules(&["dummy", "kpx_no_such_module", "veth"]);
    let missing = run_in_uml(&job).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(missing.exit_code, 127, "{missing}");
    assert_eq!(missing.modules_loaded, ["dummy", "veth"]);
    let failed: Vec<&str> = missing.modules_failed.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(failed, ["kpx_no_such_module"], "{:?}", missing.modules_failed);
}

#[test]
fn netns_veth_ipset_and_iptables_legacy_work_inside_with_a_private_run() {
    if !uml::require_uml() {
        return;
    }
    // Named after this process so that the host check below cannot see someone else's.
    let ns = format!("kpxuml{}", std::process::id());
    const SCRIPT: &str = r#"set -e
        ip netns add "$NS"
        ip -n "$NS" link add name va type veth peer name vb
        ip -n "$NS" link add kube-ipvs0 type dummy
        ip -n "$NS" link add cbr0 type bridge
        ip -n "$NS" -br link
        ipset create KUBE-CLUSTER-IP hash:ip,port
        ipset add KUBE-CLUSTER-IP 10.96.0.10,tcp:80
        iptables-legacy -t nat -N KUBE-SERVICES
        iptables-legacy -t nat -A KUBE-SERVICES -m comment --comment "kpx test" \
            -m set --match-set KUBE-CLUSTER-IP dst,dst -m addrtype --dst-type LOCAL \
            -m statistic --mode random --probability 0.5 -j MARK --set-xmark 0x4000/0x4000
        iptables-legacy -t nat -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
        iptables-legacy -t filter -A INPUT -m conntrack --ctstate INVALID -j DROP
        iptables-legacy-save -t nat
        ls /run/netns"#;
    let result = run_ok(&UmlJob::shell(SCRIPT).env("NS", &ns));
    eprintln!("netns/iptables in UML: {}", result.timings());
    for want in ["va@vb", "vb@va", "kube-ipvs0", "cbr0"] {
        assert!(result.stdout.contains(want), "no {want} in:\n{}", result.stdout);
    }
    assert!(result.stdout.contains("--match-set KUBE-CLUSTER-IP dst,dst"), "{}", result.stdout);
    assert!(result.stdout.contains("-j MASQUERADE"), "{}", result.stdout);
    assert!(result.stdout.lines().any(|l| l == ns), "namespace not in UML's /run/netns:\n{}", result.stdout);
    assert!(!std::path::Path::new("/run/netns").join(&ns).exists(), "the namespace leaked into the host's /run");
}

#[test]
fn a_cargo_built_binary_serves_and_answers_on_loopback() {
    if !uml::require_uml() {
        return;
    }
    const SCRIPT: &str = r#"set -e
        "$TESTPOD" serve web-1 127.0.0.1:8080 [::1]:8080 >serve.out &
        for _ in $(seq 200); do grep -q ready serve.out && break; sleep 0.05; done
        "$TESTPOD" get tcp 127.0.0.1:8080
        "$TESTPOD" get udp [::1]:8080
        kill %1"#;
    let job = UmlJob::shell(SCRIPT).env("TESTPOD", env!("CARGO_BIN_EXE_kpx-testpod"));
    let result = run_ok(&job);
    eprintln!("kpx-testpod in UML: {}", result.timings());
    let lines: Vec<&str> = result.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{result}");
    assert!(lines[0].starts_with("answered web-1 127.0.0.1:") && lines[0].ends_with(" 127.0.0.1:8080"), "{result}");
    assert!(lines[1].starts_with("answered web-1 [::1]:") && lines[1].ends_with(" [::1]:8080"), "{result}");
}

/// Whether a process of the run whose work dir is WORK still exists (by its `umid=`).
fn uml_processes_of(work: &str) -> Vec<u32> {
    let name = std::path::Path::new(work).file_name().unwrap().to_string_lossy().into_owned();
    let umid = format!("umid=kpx-{name}").into_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline.split(|&b| b == 0).any(|a| a == umid).then_some(pid)
        })
        .collect()
}

#[test]
fn a_hanging_job_is_killed_at_its_timeout_with_nothing_left_behind() {
    if !uml::require_uml() {
        return;
    }
    let job = UmlJob::new(&["sleep", "600"]).modules(&[]).timeout(Duration::from_secs(12));
    let started = std::time::Instant::now();
    let err = run_in_uml(&job).expect_err("sleep 600 finished within 12 s");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let UmlError::Timeout { console, work, .. } = &err else { panic!("not a timeout: {err}") };
    assert!(console.contains("kpx-init: running sleep 600"), "the job never started:\n{err}");
    assert_eq!(uml_processes_of(work), Vec::<u32>::new(), "UML processes left after the timeout");
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn a_kernel_crash_is_an_error_with_the_console() {
    if !uml::require_uml() {
        return;
    }
    let job = UmlJob::shell("echo c >/proc/sysrq-trigger; sleep 600").modules(&[]).timeout(Duration::from_secs(30));
    let err = run_in_uml(&job).expect_err("the kernel crashed, yet a result came back");
    let UmlError::NoResult { console, work, .. } = &err else { panic!("not a missing result: {err}") };
    assert!(console.contains("sysrq: Trigger a crash"), "console has no crash:\n{err}");
    assert_eq!(uml_processes_of(work), Vec::<u32>::new(), "UML processes left after the crash");
    let _ = std::fs::remove_dir_all(work);
}
