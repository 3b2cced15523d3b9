//! Redis Sentinel: every new connection asks the sentinels which server is the master
//! now, so reconnecting after a failover reaches the promoted replica. Resolved here
//! rather than with the redis crate's `sentinel` module, whose synchronous client
//! connects and reads without timeouts: a stopped sentinel would hang every command.

use std::time::Duration;

use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, RedisConnectionInfo, RedisResult, Role,
};

use super::connection::one_line;
use crate::store::SentinelConfig;

/// A sentinel gets this long to connect and to answer: a healthy one answers at once,
/// and a dead one must not hold up asking the next.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

/// The sentinels of one master, and how to reach that master once it is named.
#[derive(Clone)]
pub(super) struct Sentinels {
    nodes: Vec<(String, u16)>,
    master_name: String,
    /// The master's settings but its address: TLS, db, user, password.
    master: ConnectionInfo,
}

/// Why no master connection could be opened.
pub(super) struct Unresolved {
    pub message: String,
    /// A sentinel named a master that cannot serve (dead, or no longer a master): a
    /// failover is under way and asking again shortly may succeed.
    pub failing_over: bool,
}

impl Sentinels {
    pub(super) fn new(nodes: &[(String, u16)], master_name: &str, master: ConnectionInfo) -> Self {
        Sentinels {
            nodes: nodes.to_vec(),
            master_name: master_name.to_string(),
            master,
        }
    }

    /// Connects to the first master a sentinel names that `ROLE` confirms as one (a
    /// sentinel may not have noticed a failover yet). Returns the connection and the
    /// master's address.
    pub(super) fn connect(
        &self,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<(Connection, String), Unresolved> {
        let mut silent = Vec::new();
        let mut unfit: Option<(String, bool)> = None;
        for node in &self.nodes {
            let named = match self.ask(node) {
                Ok(Some(named)) => named,
                Ok(None) => continue,
                Err(err) => {
                    silent.push(format!("{}: {}", address(node), one_line(&err)));
                    continue;
                }
            };
            let master = address(&named);
            match self.open_master(named, connect_timeout, io_timeout) {
                Ok(connection) => return Ok((connection, master)),
                Err((reason, failing_over)) => {
                    let named_by = address(node);
                    unfit = Some((
                        format!("{master} (named by {named_by}): {reason}"),
                        failing_over,
                    ));
                }
            }
        }
        let name = &self.master_name;
        Err(match (unfit, silent.len() == self.nodes.len()) {
            (Some((unfit, failing_over)), _) => Unresolved {
                message: format!("master '{name}' at {unfit}"),
                failing_over,
            },
            (None, true) => Unresolved {
                message: format!(
                    "no sentinel of master '{name}' answered ({})",
                    silent.join("; ")
                ),
                failing_over: false,
            },
            (None, false) => Unresolved {
                message: format!(
                    "the sentinels {} know no master named '{name}'",
                    addresses(&self.nodes)
                ),
                failing_over: false,
            },
        })
    }

    /// The master's address according to one sentinel; `None` when it knows no
    /// master of that name. A sentinel that asks for a password gets the master's.
    fn ask(&self, node: &(String, u16)) -> RedisResult<Option<(String, u16)>> {
        let query = |settings: RedisConnectionInfo| -> RedisResult<Option<(String, u16)>> {
            let info = self
                .master
                .clone()
                .set_addr(self.addr(node.clone()))
                .set_redis_settings(settings);
            let mut connection =
                Client::open(info)?.get_connection_with_timeout(SENTINEL_TIMEOUT)?;
            connection.set_read_timeout(Some(SENTINEL_TIMEOUT))?;
            connection.set_write_timeout(Some(SENTINEL_TIMEOUT))?;
            let named: Option<(String, String)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master_name)
                .query(&mut connection)?;
            Ok(named.and_then(|(host, port)| Some((host, port.parse().ok()?))))
        };
        let master = self.master.redis_settings();
        match query(RedisConnectionInfo::default()) {
            Err(err) if err.code() == Some("NOAUTH") && master.password().is_some() => {
                let mut settings = RedisConnectionInfo::default();
                if let Some(user) = master.username() {
                    settings = settings.set_username(user);
                }
                query(settings.set_password(master.password().unwrap_or_default()))
            }
            result => result,
        }
    }

    /// A connection to the named master, or why not and whether a failover explains
    /// it (it is unreachable or not a master; a refused password is not).
    fn open_master(
        &self,
        (host, port): (String, u16),
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Connection, (String, bool)> {
        let failed = |err: redis::RedisError| (one_line(&err), err.is_io_error());
        let info = self.master.clone().set_addr(self.addr((host, port)));
        let mut connection = Client::open(info)
            .and_then(|client| client.get_connection_with_timeout(connect_timeout))
            .map_err(failed)?;
        connection
            .set_read_timeout(Some(io_timeout))
            .and_then(|()| connection.set_write_timeout(Some(io_timeout)))
            .and_then(|()| redis::cmd("ROLE").query::<Role>(&mut connection))
            .map_err(failed)
            .and_then(|role| match role {
                Role::Primary { .. } => Ok(connection),
                _ => Err(("it is not a master (yet)".to_string(), true)),
            })
    }

    /// `host:port` over the master's transport: TLS when the configured URL is `rediss://`.
    fn addr(&self, (host, port): (String, u16)) -> ConnectionAddr {
        match self.master.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        }
    }
}

/// Where the store lives, for messages.
pub(super) fn location(config: &SentinelConfig) -> String {
    format!(
        "the master '{}' of sentinels {}",
        config.master,
        addresses(&config.nodes)
    )
}

fn addresses(nodes: &[(String, u16)]) -> String {
    let nodes: Vec<String> = nodes.iter().map(address).collect();
    nodes.join(",")
}

/// `host:port`, with brackets around an IPv6 address.
fn address((host, port): &(String, u16)) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}
