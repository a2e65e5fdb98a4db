//! `sigil`: fetch and inspect SPIFFE identities, and explain which pods get which IDs.
//!
//! - `sigil x509 fetch|watch`, `sigil jwt fetch|validate`, `sigil bundle show`: a
//!   Workload API client (the Rust `spiffe` crate), like `spire-agent api`.
//! - `sigil explain pod <ns>/<name>`: asks the API server and renders with the operator's
//!   own index code.
//! - `sigil inspect <file|token>`: decodes an X509-SVID (PEM) or a JWT-SVID, and checks it
//!   against a bundle when given one.
//! - `sigil migrate <files|dirs>|--from-cluster`: spire-controller-manager objects to
//!   Sigil's, with a report of what could not be carried ([`migrate`]).
//! - `sigil agent ban|unban <node>`: the operator-side deny list for a stolen agent key
//!   (the Node annotation `sigil.dev/agent-banned`).
//!
//! Exit codes: 0 success; 1 could not get an answer (agent, API server, files); 2 usage;
//! 3 the answer is negative (an SVID or token that does not verify, a pod without an
//! identity).

pub mod agent;
mod explain;
mod inspect;
pub mod migrate;
mod output;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status when an identity does not verify or a pod has none.
pub const EXIT_NEGATIVE: i32 = 3;

/// `sigil`: SPIFFE identities from the command line.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// One JSON document.
    Json,
}

/// Where the Workload API is.
#[derive(Debug, Clone, clap::Args)]
pub struct SocketArgs {
    /// Workload API address (`unix:///path`); default `SPIFFE_ENDPOINT_SOCKET`, then
    /// `unix:///run/sigil/agent/api.sock`.
    #[arg(
        long,
        short = 's',
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///run/sigil/agent/api.sock"
    )]
    pub socket: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: Output,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// X509-SVIDs from the Workload API.
    #[command(subcommand)]
    X509(X509Command),
    /// JWT-SVIDs from the Workload API.
    #[command(subcommand)]
    Jwt(JwtCommand),
    /// Trust bundles from the Workload API.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Explain which ClusterSPIFFEIDs give a pod which identities, and why not.
    #[command(subcommand)]
    Explain(ExplainCommand),
    /// Decode an X509-SVID (PEM file) or a JWT-SVID, and check it against a bundle.
    Inspect(inspect::InspectArgs),
    /// Ban or unban a node's agent (a stolen agent key, a compromised node).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Convert spire-controller-manager objects (ClusterSPIFFEID,
    /// ClusterFederatedTrustDomain, ClusterStaticEntry) to Sigil's, reporting every field
    /// that could not be carried.
    Migrate(migrate::MigrateArgs),
}

/// `sigil agent ...`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Ban the agent of a node: the operator ends its entry stream and refuses its renewal,
    /// attestation, CSR signing and JWT minting within about a second (label
    /// node-restriction.kubernetes.io/sigil-agent-banned and annotation
    /// sigil.dev/agent-banned on the Node).
    Ban {
        /// The Node.
        node: String,
        /// Why (kept in the annotation, and shown to the agent in every refusal).
        #[arg(long, default_value = "agent key compromised")]
        reason: String,
        /// Kubeconfig (default: KUBECONFIG, then in-cluster).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
    /// Lift a ban: the node's agent may attest again.
    Unban {
        /// The Node.
        node: String,
        /// Kubeconfig (default: KUBECONFIG, then in-cluster).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
}

/// `sigil x509 ...`
#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Fetch this workload's X509-SVIDs once.
    Fetch {
        /// Socket and output.
        #[command(flatten)]
        socket: SocketArgs,
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long, short = 'w')]
        write: Option<PathBuf>,
    },
    /// Print every update (rotation, new bundle) until interrupted.
    Watch {
        /// Socket and output.
        #[command(flatten)]
        socket: SocketArgs,
        /// Stop after this many updates (the first answer counts).
        #[arg(long)]
        count: Option<usize>,
    },
}

/// `sigil jwt ...`
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Fetch a JWT-SVID for an audience.
    Fetch {
        /// Socket and output.
        #[command(flatten)]
        socket: SocketArgs,
        /// The audience (repeat for several).
        #[arg(long, short = 'a', required = true)]
        audience: Vec<String>,
        /// Which identity, when the workload has several.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Validate a JWT-SVID through the Workload API (`-` reads it from stdin).
    Validate {
        /// Socket and output.
        #[command(flatten)]
        socket: SocketArgs,
        /// The audience the token must carry.
        #[arg(long, short = 'a')]
        audience: String,
        /// The token.
        token: String,
    },
}

/// `sigil bundle ...`
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Show the trust bundles this workload gets.
    Show {
        /// Socket and output.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the X.509 authorities as PEM instead.
        #[arg(long)]
        pem: bool,
    },
}

/// `sigil explain ...`
#[derive(Debug, Subcommand)]
pub enum ExplainCommand {
    /// Explain a pod: `sigil explain pod <namespace>/<name>`.
    Pod {
        /// `<namespace>/<name>`.
        pod: String,
        /// Kubeconfig (default: KUBECONFIG, then in-cluster).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// The operator's cluster name (the `clusterName` template field).
        #[arg(long, default_value = "cluster")]
        cluster_name: String,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: Output,
    },
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sigil: cannot start: {e}");
            return 1;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::X509(X509Command::Fetch { socket, write }) => {
                workload::x509_fetch(&socket, write.as_deref()).await
            }
            Command::X509(X509Command::Watch { socket, count }) => {
                workload::x509_watch(&socket, count).await
            }
            Command::Jwt(JwtCommand::Fetch {
                socket,
                audience,
                spiffe_id,
            }) => workload::jwt_fetch(&socket, &audience, spiffe_id.as_deref()).await,
            Command::Jwt(JwtCommand::Validate {
                socket,
                audience,
                token,
            }) => workload::jwt_validate(&socket, &audience, &token).await,
            Command::Bundle(BundleCommand::Show { socket, pem }) => {
                workload::bundle_show(&socket, pem).await
            }
            Command::Explain(ExplainCommand::Pod {
                pod,
                kubeconfig,
                cluster_name,
                output,
            }) => explain::pod(&pod, kubeconfig.as_deref(), &cluster_name, output).await,
            Command::Inspect(args) => inspect::run(&args),
            Command::Migrate(args) => migrate::run(&args).await,
            Command::Agent(AgentCommand::Ban {
                node,
                reason,
                kubeconfig,
                output,
            }) => agent::run(true, &node, &reason, kubeconfig.as_deref(), output).await,
            Command::Agent(AgentCommand::Unban {
                node,
                kubeconfig,
                output,
            }) => agent::run(false, &node, "", kubeconfig.as_deref(), output).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sigil: {e:#}");
            1
        }
    }
}
