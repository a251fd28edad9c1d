//! Where a worker sits in the world, from whichever launcher started it: torchrun
//! (and `sheaf launch`), SLURM's `srun`, Open MPI's and MPICH's `mpirun`, or a
//! Kubernetes Indexed Job. Each launcher that says anything must say all of rank and
//! world, and launchers that say something must agree: an incomplete or contradictory
//! environment is an error naming the variable, never a silent world of one (which
//! would train N separate copies of the job).

use sheaf_plugins::HostError;

/// Where this worker sits in the world, as torchrun's variables say.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher says the world spans more than one host.
    pub spans_hosts: bool,
}

impl WorkerEnv {
    /// From the environment of whichever launcher started this process (torchrun,
    /// SLURM, Open MPI, MPICH, a Kubernetes Indexed Job: this module); a world of
    /// one when none did.
    pub fn from_env() -> Result<WorkerEnv, HostError> {
        from_vars(|k| std::env::var(k).ok())
    }

    /// The address peers reach this rank at: `SHEAF_ADVERTISE_ADDR`, or loopback when
    /// the master is on this host, or else this host's address on the route to the
    /// master (a UDP socket's local address once connected; nothing is sent).
    pub fn advertise_addr(&self) -> Result<Option<String>, HostError> {
        if let Ok(a) = std::env::var("SHEAF_ADVERTISE_ADDR") {
            return Ok(Some(a));
        }
        let loopback = self.master_addr == "localhost"
            || self.master_addr.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if self.world_size == 1 || loopback {
            return Ok(None);
        }
        use std::net::ToSocketAddrs;
        let master = (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .map_err(|e| HostError::input(format!("MASTER_ADDR={} does not resolve", self.master_addr), e))?
            .next()
            .ok_or_else(|| HostError::Usage(format!("MASTER_ADDR={} has no address", self.master_addr)))?;
        let any: std::net::SocketAddr = if master.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let route = std::net::UdpSocket::bind(any)
            .and_then(|s| s.connect(master).and_then(|()| s.local_addr()))
            .map_err(|e| {
                HostError::input(format!("no route to MASTER_ADDR={} ({master})", self.master_addr), e)
            })?;
        Ok(Some(route.ip().to_string()))
    }
}

/// Every variable `sheaf run` reads to place itself (its `--help`).
pub const HELP: &str = "\
Variables read to place this worker in the world (the first launcher that sets any of them; \
launchers that set them must agree):
  RANK, WORLD_SIZE, LOCAL_RANK              torchrun, and sheaf launch
  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID srun; master: the first host of SLURM_JOB_NODELIST
                                            (or SLURM_NODELIST), port 20000 + SLURM_JOB_ID % 20000
  OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
                                            Open MPI's mpirun
  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID       MPICH's mpirun
  JOB_COMPLETION_INDEX (with WORLD_SIZE)    a Kubernetes Indexed Job
  MASTER_ADDR, MASTER_PORT                  where rank 0 meets the others (port 29500 by default)
  TORCHELASTIC_USE_AGENT_STORE=True         torchrun's agent already serves its store on
                                            MASTER_PORT: rank 0 meets the others at MASTER_PORT + 2
                                            (sheaf doctor's roll call at MASTER_PORT + 3)
  SHEAF_MASTER_PORT                         where rank 0 meets the others, over all of the above
                                            (when something else holds MASTER_PORT: deploy/ray_train.py)
  SHEAF_JOB_TOKEN                           the job's secret, the same on every rank (required
                                            for a world of more than one)
  SHEAF_ADVERTISE_ADDR                      the address peers reach this rank at (default: this
                                            host's address on the route to the master)
  LOCAL_RANK (or the launcher's local rank) with compute.device = \"cuda\" picks cuda:LOCAL_RANK
  LOCAL_WORLD_SIZE, SLURM_JOB_NUM_NODES, OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS
                                            whether the world spans hosts: then a job that names
                                            no transport.plugin runs over `auto` (shared memory
                                            inside each host, ZeroMQ between)";

/// One launcher's say: the variables it uses for rank, world and local rank.
struct Source {
    name: &'static str,
    rank: &'static str,
    world: &'static str,
    local: Option<&'static str>,
}

const SOURCES: [Source; 5] = [
    Source { name: "torchrun", rank: "RANK", world: "WORLD_SIZE", local: Some("LOCAL_RANK") },
    Source { name: "SLURM", rank: "SLURM_PROCID", world: "SLURM_NTASKS", local: Some("SLURM_LOCALID") },
    Source {
        name: "Open MPI",
        rank: "OMPI_COMM_WORLD_RANK",
        world: "OMPI_COMM_WORLD_SIZE",
        local: Some("OMPI_COMM_WORLD_LOCAL_RANK"),
    },
    Source { name: "MPICH/PMI", rank: "PMI_RANK", world: "PMI_SIZE", local: Some("MPI_LOCALRANKID") },
    Source { name: "Kubernetes", rank: "JOB_COMPLETION_INDEX", world: "WORLD_SIZE", local: None },
];

fn usage(detail: String) -> HostError {
    HostError::Usage(detail)
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, HostError> {
    value.trim().parse().map_err(|_| usage(format!("{name}={value} is not a number")))
}

/// The worker's place from the variables `get` returns (the process environment in
/// [`WorkerEnv::from_env`]).
pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv, HostError> {
    let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    // Every launcher that says something: (name, rank, world, local rank).
    let mut said: Vec<(&'static str, usize, usize, Option<usize>)> = Vec::new();
    for s in &SOURCES {
        // WORLD_SIZE alone belongs to torchrun; Kubernetes speaks through its index.
        let (rank, world) = (get(s.rank), get(s.world));
        let speaks = match s.name {
            "Kubernetes" => rank.is_some(),
            "torchrun" => rank.is_some() || (world.is_some() && get("JOB_COMPLETION_INDEX").is_none()),
            _ => rank.is_some() || world.is_some(),
        };
        if !speaks {
            continue;
        }
        let (Some(rank), Some(world)) = (&rank, &world) else {
            let (set, missing) = if rank.is_some() { (s.rank, s.world) } else { (s.world, s.rank) };
            return Err(usage(format!(
                "{set} is set ({} launched this process?) but {missing} is not: set it too, or unset {set}",
                s.name
            )));
        };
        let (rank, world): (usize, usize) = (number(s.rank, rank)?, number(s.world, world)?);
        if world == 0 || rank >= world {
            return Err(usage(format!("{}={rank} is outside {}={world}", s.rank, s.world)));
        }
        let local = s.local.and_then(|l| get(l).map(|v| number(l, &v))).transpose()?;
        said.push((s.name, rank, world, local));
    }
    if let Some(&(first, rank, world, _)) = said.first() {
        if let Some(&(other, r, w, _)) = said.iter().find(|&&(_, r, w, _)| (r, w) != (rank, world)) {
            return Err(usage(format!(
                "the launchers disagree: {first} says rank {rank} of {world}, {other} says rank {r} of {w}"
            )));
        }
    }
    let (source, rank, world_size, local) = said.first().copied().unwrap_or(("none", 0, 1, None));
    let local_rank = match local {
        Some(l) => l,
        None => get("LOCAL_RANK").map(|v| number("LOCAL_RANK", &v)).transpose()?.unwrap_or(0),
    };
    let nodelist = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
    let master_addr = match (get("MASTER_ADDR"), &nodelist) {
        (Some(a), _) => a,
        (None, Some(list)) if source == "SLURM" => {
            first_host(list).map_err(|e| usage(format!("SLURM_JOB_NODELIST={list}: {e}")))?
        }
        // torchrun always sets it; without it a world is on this host.
        (None, _) if world_size > 1 && source != "torchrun" => {
            return Err(usage(format!(
            "MASTER_ADDR is not set: under {source} with a world of {world_size}, set it to rank 0's host \
                 (mpirun -x MASTER_ADDR=..., or the Job's headless Service name)"
        )))
        }
        (None, _) => "127.0.0.1".into(),
    };
    let master_port = match (get("MASTER_PORT"), get("SLURM_JOB_ID")) {
        (Some(p), _) => number("MASTER_PORT", &p)?,
        // A port every task of the job computes alike, different between jobs.
        (None, Some(id)) if source == "SLURM" => {
            20_000 + (number::<u64>("SLURM_JOB_ID", &id)? % 20_000) as u16
        }
        _ => 29_500,
    };
    // torchrun's elastic agent serves its own store on MASTER_PORT (and says so to its
    // workers): Sheaf meets two ports above it, leaving the one between to the
    // doctor's roll call's usual place, which moves up with it.
    // SHEAF_MASTER_PORT says where, over every launcher's variables.
    let master_port =
        match (get("SHEAF_MASTER_PORT"), get("TORCHELASTIC_USE_AGENT_STORE").as_deref().map(str::trim)) {
            (Some(own), _) => number("SHEAF_MASTER_PORT", &own)?,
            (None, Some("True" | "true" | "1")) => master_port.checked_add(2).ok_or_else(|| {
                usage(format!(
                    "MASTER_PORT={master_port}: torchrun's agent store holds it and Sheaf meets two ports \
                 above it, past the last port; choose a lower one (torchrun --master-port)"
                ))
            })?,
            (None, _) => master_port,
        };
    let spans_hosts = spans_hosts(source, world_size, &get)?;
    Ok(WorkerEnv { rank, world_size, local_rank, master_addr, master_port, spans_hosts })
}

/// Whether the launcher `source` says its world of `world` ranks spans more than one
/// host: by its count of nodes, or of ranks on this node; a Kubernetes Indexed Job
/// runs a rank per pod. Unknown counts as one host.
fn spans_hosts(source: &str, world: usize, get: &impl Fn(&str) -> Option<String>) -> Result<bool, HostError> {
    let count = |name: &str| get(name).map(|v| number::<usize>(name, &v)).transpose();
    Ok(match source {
        "SLURM" => match count("SLURM_JOB_NUM_NODES")?.or(count("SLURM_NNODES")?) {
            Some(nodes) => nodes > 1,
            None => false,
        },
        "Kubernetes" => world > 1,
        _ => {
            let local = match source {
                "Open MPI" => "OMPI_COMM_WORLD_LOCAL_SIZE",
                "MPICH/PMI" => "MPI_LOCALNRANKS",
                _ => "LOCAL_WORLD_SIZE",
            };
            count(local)?.is_some_and(|l| l < world)
        }
    })
}

/// Every host of a SLURM host list: `node[01-04,07],gpu3` is node01, node02, node03,
/// node04, node07, gpu3 (ranges keep their zero padding).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    let mut rest = list.trim();
    while !rest.is_empty() {
        // One entry: up to a comma outside brackets.
        let mut depth = 0i32;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                match c {
                    '[' => depth += 1,
                    ']' => depth -= 1,
                    _ => {}
                }
                c == ',' && depth == 0
            })
            .map_or(rest.len(), |(i, _)| i);
        let entry = &rest[..end];
        rest = rest[end..].strip_prefix(',').unwrap_or("");
        hosts.extend(expand_entry(entry)?);
        if hosts.len() > 1 << 20 {
            return Err("more than a million hosts".into());
        }
    }
    if hosts.is_empty() {
        return Err("no hosts".into());
    }
    Ok(hosts)
}

/// `prefix[ranges]suffix...` with any number of bracket groups.
fn expand_entry(entry: &str) -> Result<Vec<String>, String> {
    let Some(open) = entry.find('[') else {
        if entry.contains(']') || entry.is_empty() {
            return Err(format!("`{entry}` is not a host"));
        }
        return Ok(vec![entry.to_string()]);
    };
    let close =
        entry[open..].find(']').map(|i| open + i).ok_or_else(|| format!("`{entry}`: no closing ]"))?;
    let (prefix, ranges, suffix) = (&entry[..open], &entry[open + 1..close], &entry[close + 1..]);
    let tails = expand_entry_or_empty(suffix)?;
    let mut out = Vec::new();
    for part in ranges.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let bad = || format!("`{part}` in `{entry}` is not a number or a range");
        let (a, b): (u64, u64) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
        if b < a || b - a > 1 << 20 {
            return Err(format!("`{part}` in `{entry}` is not an ascending range"));
        }
        for n in a..=b {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(out)
}

fn expand_entry_or_empty(s: &str) -> Result<Vec<String>, String> {
    if s.is_empty() {
        Ok(vec![String::new()])
    } else {
        expand_entry(s)
    }
}

/// The first host of a SLURM host list (where rank 0 runs).
pub fn first_host(list: &str) -> Result<String, String> {
    expand_nodelist(list).map(|h| h[0].clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `from_vars`' variables from `pairs`, in place of the process environment.
    fn vars_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn place(pairs: &[(&str, &str)]) -> Result<WorkerEnv, String> {
        from_vars(vars_of(pairs)).map_err(|e| e.to_string())
    }

    #[test]
    fn slurm_host_lists_expand() {
        assert_eq!(
            expand_nodelist("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(expand_nodelist("a1,b[2-3],c").unwrap(), ["a1", "b2", "b3", "c"]);
        assert_eq!(expand_nodelist("r[1-2]n[08-09]").unwrap(), ["r1n08", "r1n09", "r2n08", "r2n09"]);
        assert_eq!(first_host("gpu-[003-010],cpu1").unwrap(), "gpu-003");
        for bad in ["", "node[1-", "node[b]", "node[3-1]", "]x"] {
            assert!(expand_nodelist(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_launcher_places_the_worker() {
        assert_eq!(
            place(&[]).unwrap(),
            WorkerEnv {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: 29500,
                spans_hosts: false,
            }
        );
        let t =
            place(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h0")]).unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank, t.master_addr.as_str()), (3, 4, 1, "h0"));
        // Under torchrun's agent store (on MASTER_PORT), two ports above it; at the top
        // of the range, an error naming the variable.
        let agent = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "42233")];
        assert_eq!(place(&agent).unwrap().master_port, 42233);
        let store = [agent[0], agent[1], agent[2], ("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert_eq!(place(&store).unwrap().master_port, 42235);
        // Sheaf's own variable says where, over every launcher's.
        let own = [store[0], store[1], store[2], store[3], ("SHEAF_MASTER_PORT", "5000")];
        assert_eq!(place(&own).unwrap().master_port, 5000);
        let top = [agent[0], agent[1], ("MASTER_PORT", "65534"), store[3]];
        let e = place(&top).unwrap_err();
        assert!(e.contains("MASTER_PORT=65534") && e.contains("torchrun --master-port"), "{e}");
        let s = place(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "node[04-07]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.master_addr.as_str()), (5, 8, 1, "node04"));
        assert_eq!(s.master_port, 20_000 + (123_456 % 20_000) as u16);
        assert!(!s.spans_hosts, "SLURM without a node count: one host");
        let o = place(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((o.rank, o.world_size, o.master_port), (2, 4, 4000));
        let p = place(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MASTER_ADDR", "m")]).unwrap();
        assert_eq!((p.rank, p.world_size), (1, 2));
        let k = place(&[("JOB_COMPLETION_INDEX", "2"), ("WORLD_SIZE", "3"), ("MASTER_ADDR", "svc-0.svc")])
            .unwrap();
        assert_eq!((k.rank, k.world_size, k.master_addr.as_str()), (2, 3, "svc-0.svc"));
        // torchrun's variables set by srun's task prolog agree with SLURM's: fine.
        place(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "a"),
        ])
        .unwrap();
    }

    /// Each launcher's node or local-rank count says whether the world spans hosts
    /// (and so which transport a job naming none runs over).
    #[test]
    fn launchers_say_whether_the_world_spans_hosts() {
        let spans = |pairs: &[(&str, &str)]| place(pairs).unwrap().spans_hosts;
        let t = [("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "m")];
        assert!(!spans(&t), "torchrun without LOCAL_WORLD_SIZE");
        assert!(spans(&[t[0], t[1], t[2], ("LOCAL_WORLD_SIZE", "2")]));
        assert!(!spans(&[t[0], t[1], t[2], ("LOCAL_WORLD_SIZE", "4")]));
        let s = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_NODELIST", "n[1-2]")];
        assert!(spans(&[s[0], s[1], s[2], ("SLURM_JOB_NUM_NODES", "2")]));
        assert!(!spans(&[s[0], s[1], s[2], ("SLURM_NNODES", "1")]));
        let o = [("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "4"), ("MASTER_ADDR", "m")];
        assert!(spans(&[o[0], o[1], o[2], ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]));
        assert!(spans(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("MPI_LOCALNRANKS", "1"),
            ("MASTER_ADDR", "m")
        ]));
        assert!(spans(&[("JOB_COMPLETION_INDEX", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "m")]));
        let e = place(&[t[0], t[1], t[2], ("LOCAL_WORLD_SIZE", "two")]).unwrap_err();
        assert!(e.contains("LOCAL_WORLD_SIZE=two is not a number"), "{e}");
    }

    #[test]
    fn incomplete_or_contradictory_environments_are_errors_naming_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("SLURM_PROCID", "1")], "SLURM_NTASKS is not"),
            (&[("JOB_COMPLETION_INDEX", "1"), ("MASTER_ADDR", "m")], "WORLD_SIZE is not"),
            (&[("OMPI_COMM_WORLD_SIZE", "2")], "OMPI_COMM_WORLD_RANK is not"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "outside WORLD_SIZE=2"),
            (&[("PMI_RANK", "x"), ("PMI_SIZE", "2")], "PMI_RANK=x is not a number"),
            (&[("PMI_RANK", "1"), ("PMI_SIZE", "2")], "MASTER_ADDR is not set"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")],
                "the launchers disagree: torchrun says rank 0 of 2, SLURM says rank 1 of 2",
            ),
            (
                &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", "n[1-")],
                "SLURM_JOB_NODELIST",
            ),
        ];
        for (vars, needle) in cases {
            let e = place(vars).unwrap_err();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }

    /// What only one launcher says is that launcher's: WORLD_SIZE alone is torchrun's
    /// (and missing its RANK), a SLURM host list or job id beside torchrun's variables
    /// does not move torchrun's master.
    #[test]
    fn each_launcher_says_only_its_own() {
        let e = place(&[("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.contains("WORLD_SIZE is set (torchrun launched this process?) but RANK is not"), "{e}");
        let t = place(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("SLURM_JOB_NODELIST", "node[1-2]"),
            ("SLURM_JOB_ID", "123"),
        ])
        .unwrap();
        assert_eq!((t.master_addr.as_str(), t.master_port), ("127.0.0.1", 29500));
        let one_node = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_NUM_NODES", "1"),
            ("MASTER_ADDR", "m"),
        ];
        assert!(!place(&one_node).unwrap().spans_hosts);
        let one_pod = [("JOB_COMPLETION_INDEX", "0"), ("WORLD_SIZE", "1")];
        assert!(!place(&one_pod).unwrap().spans_hosts, "a Kubernetes world of one is one host");
    }

    /// A host list of exactly 2^20 hosts expands; one more is refused.
    #[test]
    fn host_lists_stop_at_a_million_hosts() {
        assert_eq!(expand_nodelist("n[1-1048576]").unwrap().len(), 1 << 20);
        let e = expand_nodelist("n[0-1048576]").unwrap_err();
        assert!(e.contains("more than a million hosts"), "{e}");
        // One range of more than 2^20 + 1 numbers is refused before it is expanded.
        let e = expand_nodelist("n[0-1048577]").unwrap_err();
        assert!(e.contains("is not an ascending range"), "{e}");
        assert_eq!(expand_nodelist("n[0-2]").unwrap(), ["n0", "n1", "n2"]);
        assert_eq!(expand_nodelist("n[1048574-1048576]").unwrap().len(), 3);
    }

    /// Peers reach a rank on loopback when the master is this host or the world is
    /// this rank; else at this host's address on the route to the master (here, when
    /// the machine has such a route).
    #[test]
    fn ranks_advertise_loopback_or_the_route_to_the_master() {
        if std::env::var_os("SHEAF_ADVERTISE_ADDR").is_some() {
            return;
        }
        let env = |master: &str, world_size| WorkerEnv {
            rank: 0,
            world_size,
            local_rank: 0,
            master_addr: master.into(),
            master_port: 29500,
            spans_hosts: false,
        };
        for master in ["localhost", "127.0.0.1", "127.0.0.2", "::1"] {
            assert_eq!(env(master, 2).advertise_addr().unwrap(), None, "{master}");
        }
        // TEST-NET-1: never a host here, so never loopback.
        assert_eq!(env("192.0.2.1", 1).advertise_addr().unwrap(), None, "a world of one");
        match env("192.0.2.1", 2).advertise_addr() {
            Ok(Some(addr)) => {
                let ip: std::net::IpAddr = addr.parse().unwrap();
                assert!(!ip.is_loopback() && !ip.is_unspecified(), "{addr}");
            }
            Ok(None) => panic!("a remote master needs this host's address"),
            Err(e) => assert!(e.to_string().contains("no route to MASTER_ADDR=192.0.2.1"), "{e}"),
        }
    }
}
