//! A fleet for the tests: one real Redis and hosts around it, each the real binary
//! with its own `CANHAZGPU_HOST_NAME`.

use serde_json::Value;

use super::cli::CliEnv;
use super::history::now;
use super::redis::TestRedis;

/// One Redis and the hosts around it.
pub struct Fleet {
    pub server: TestRedis,
}

impl Fleet {
    pub fn launch() -> Self {
        Fleet {
            server: TestRedis::launch(),
        }
    }

    /// The binary as it runs on host `name`.
    pub fn host(&self, name: &str) -> CliEnv {
        let mut env = CliEnv::redis(&self.server.url());
        env.set_var("CANHAZGPU_HOST_NAME", name);
        env
    }

    /// Host `name` with a pool of `gpus` fake GPUs.
    pub fn host_with(&self, name: &str, gpus: u32) -> CliEnv {
        let env = self.host(name);
        env.init_fake(gpus);
        env
    }

    pub fn redis(&self, args: &[&str]) -> Value {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        let value: redis::Value = command.query(&mut self.server.raw()).unwrap();
        match value {
            redis::Value::Nil => Value::Null,
            redis::Value::Int(n) => Value::from(n),
            redis::Value::BulkString(bytes) => Value::from(String::from_utf8(bytes).unwrap()),
            redis::Value::Array(items) => Value::Array(
                items
                    .into_iter()
                    .map(|item| match item {
                        redis::Value::BulkString(bytes) => {
                            Value::from(String::from_utf8(bytes).unwrap())
                        }
                        other => Value::from(format!("{other:?}")),
                    })
                    .collect(),
            ),
            redis::Value::Okay => Value::from("OK"),
            other => Value::from(format!("{other:?}")),
        }
    }

    /// Makes `host` look as if its last snapshot was taken `age` seconds ago.
    pub fn age_snapshot(&self, host: &str, age: i64) {
        let taken_at = now() - age;
        let snapshot = format!(r#"{{"taken_at":{taken_at},"gpus":[]}}"#);
        self.redis(&["SET", &format!("canhazgpu:{{{host}}}:snapshot"), &snapshot]);
        self.redis(&[
            "HSET",
            "canhazgpu:hosts:reported",
            host,
            &taken_at.to_string(),
        ]);
    }
}
