//! AI model detection: which model a GPU process serves or evaluates, read from its
//! command line (or that of up to three ancestors, since vLLM workers rename
//! themselves and inference servers often run under a launcher).
//!
//! Recognised, in this order:
//! - lm_eval: `--model_args pretrained=M,...` or `--model_args '{"pretrained": "M"}'`
//!   (an lm_eval command never falls back to `--model`, which names a backend there);
//! - vLLM: `vllm serve M` (unless the token after `serve` is an option);
//! - SGLang `--model-path M`, TGI `--model-id M`, Hugging Face
//!   `--model_name_or_path M`, and any `--model M` (vLLM's
//!   `python -m vllm.entrypoints.openai.api_server --model M` included);
//!   `--flag=M` works too, empty values are ignored.
//!
//! Local paths are reduced to a Hub-like name: a Hugging Face cache directory
//! (`.../models--org--name/snapshots/<hash>`) gives `org/name`; any other absolute or
//! `./` path keeps its last two components (`/models/meta-llama/Llama-2` gives
//! `meta-llama/Llama-2`) unless the parent is a generic directory such as `models`
//! or `checkpoints`, which is dropped (`/data/models/llama-7b` gives `llama-7b`).

use super::procinfo;

/// A detected model: `provider` is the part of `model` before the first `/`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    pub provider: String,
    pub model: String,
}

/// How many ancestors of a GPU process are searched as well.
const MAX_ANCESTORS: usize = 3;

/// Flags whose value names the model, most specific first.
const MODEL_FLAGS: [&str; 5] = [
    "--model-path",
    "--model-id",
    "--model_name_or_path",
    "--model-name-or-path",
    "--model",
];

/// Parent directory names that say nothing about who published a model.
const GENERIC_DIRS: [&str; 16] = [
    "models",
    "model",
    "weights",
    "checkpoints",
    "checkpoint",
    "ckpt",
    "data",
    "hf",
    "huggingface",
    "hub",
    "home",
    "mnt",
    "tmp",
    "root",
    "scratch",
    "workspace",
];

/// Detects the model served by `pid` from its command line and up to three parents
/// (never looking at PID 1 or below).
pub fn detect_for_pid(pid: u32) -> Option<ModelInfo> {
    let mut current = pid;
    for _ in 0..=MAX_ANCESTORS {
        if current <= 1 {
            return None;
        }
        if let Some(model) = procinfo::cmdline(current).and_then(|args| detect_from_args(&args)) {
            return Some(model);
        }
        current = procinfo::parent_pid(current)?;
    }
    None
}

/// Detects the model named by a command line. Arguments are also split on
/// whitespace, because `sh -c` and retitled processes put a whole command in one.
pub fn detect_from_args(args: &[String]) -> Option<ModelInfo> {
    let tokens: Vec<&str> = args.iter().flat_map(|arg| arg.split_whitespace()).collect();
    let raw = if tokens
        .iter()
        .any(|token| is_lm_eval(token) || is_flag(token, "--model_args"))
    {
        lm_eval_pretrained(&tokens)?
    } else {
        vllm_serve_positional(&tokens)
            .or_else(|| {
                MODEL_FLAGS
                    .iter()
                    .find_map(|flag| flag_value(&tokens, flag))
            })?
            .to_owned()
    };
    model_info(&raw)
}

fn is_flag(token: &str, flag: &str) -> bool {
    token == flag
        || token
            .strip_prefix(flag)
            .is_some_and(|rest| rest.starts_with('='))
}

/// `lm_eval`, `lm-eval`, `/venv/bin/lm_eval`, or the module of `python -m lm_eval`.
fn is_lm_eval(token: &str) -> bool {
    matches!(basename(token), "lm_eval" | "lm-eval")
}

/// `vllm`, `/venv/bin/vllm`, or a module path such as `vllm.entrypoints.openai.api_server`.
fn is_vllm(token: &str) -> bool {
    basename(token) == "vllm" || token.starts_with("vllm.")
}

fn basename(token: &str) -> &str {
    token.rsplit('/').next().unwrap_or(token)
}

/// The first non-empty value of `flag`, given as `flag VALUE` or `flag=VALUE`.
fn flag_value<'a>(tokens: &[&'a str], flag: &str) -> Option<&'a str> {
    tokens.iter().enumerate().find_map(|(at, token)| {
        let value = if *token == flag {
            tokens
                .get(at + 1)
                .copied()
                .filter(|next| !next.starts_with('-'))?
        } else {
            token.strip_prefix(flag)?.strip_prefix('=')?
        };
        (!value.is_empty()).then_some(value)
    })
}

/// The model in `vllm ... serve MODEL`.
fn vllm_serve_positional<'a>(tokens: &[&'a str]) -> Option<&'a str> {
    let vllm_at = tokens.iter().position(|token| is_vllm(token))?;
    let serve_at = vllm_at
        + tokens[vllm_at..]
            .iter()
            .position(|token| *token == "serve")?;
    tokens
        .get(serve_at + 1)
        .copied()
        .filter(|model| !model.starts_with('-'))
}

/// `pretrained` from `--model_args`, as `key=value,...` or as a JSON object.
fn lm_eval_pretrained(tokens: &[&str]) -> Option<String> {
    let at = tokens
        .iter()
        .position(|token| is_flag(token, "--model_args"))?;
    let (first, rest) = match tokens[at].strip_prefix("--model_args=") {
        Some(inline) => (inline, &tokens[at + 1..]),
        None => (
            *tokens.get(at + 1)?,
            tokens.get(at + 2..).unwrap_or_default(),
        ),
    };
    if first.starts_with('{') {
        return json_pretrained(first, rest);
    }
    first
        .split(',')
        .find_map(|pair| pair.strip_prefix("pretrained="))
        .filter(|model| !model.is_empty())
        .map(str::to_owned)
}

/// `pretrained` of a JSON object starting at `first`, which whitespace splitting may
/// have spread over the following tokens.
fn json_pretrained(first: &str, rest: &[&str]) -> Option<String> {
    let mut depth = 0usize;
    let mut object = Vec::new();
    for token in std::iter::once(&first).chain(rest) {
        object.push(*token);
        for byte in token.bytes() {
            match byte {
                b'{' => depth += 1,
                b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if depth == 0 {
            break;
        }
    }
    let parsed: serde_json::Value = serde_json::from_str(&object.join(" ")).ok()?;
    parsed.get("pretrained")?.as_str().map(str::to_owned)
}

/// Normalises a raw model value into a [`ModelInfo`].
fn model_info(raw: &str) -> Option<ModelInfo> {
    let model = if is_local_path(raw) {
        local_model_name(raw)?
    } else {
        raw.trim_end_matches('/').to_owned()
    };
    if model.is_empty() {
        return None;
    }
    let provider = model
        .split_once('/')
        .map_or("", |(provider, _)| provider)
        .to_owned();
    Some(ModelInfo { provider, model })
}

fn is_local_path(raw: &str) -> bool {
    ["/", "./", "../", "~/"]
        .iter()
        .any(|prefix| raw.starts_with(prefix))
}

fn local_model_name(path: &str) -> Option<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|part| !matches!(*part, "" | "." | ".." | "~"))
        .collect();
    if let Some(cached) = parts.iter().find_map(|part| part.strip_prefix("models--")) {
        return Some(cached.replace("--", "/"));
    }
    match parts.as_slice() {
        [] => None,
        [.., parent, name] if !GENERIC_DIRS.contains(&parent.to_ascii_lowercase().as_str()) => {
            Some(format!("{parent}/{name}"))
        }
        [.., name] => Some((*name).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(command: &str) -> Option<(String, String)> {
        let args: Vec<String> = command.split(' ').map(str::to_owned).collect();
        detect_from_args(&args).map(|info| (info.provider, info.model))
    }

    #[test]
    fn detection_table() {
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            // vLLM
            (
                "vllm serve meta-llama/Llama-2-7b-chat-hf",
                Some(("meta-llama", "meta-llama/Llama-2-7b-chat-hf")),
            ),
            (
                "/opt/venv/bin/vllm serve Qwen/Qwen2.5-7B --port 8000",
                Some(("Qwen", "Qwen/Qwen2.5-7B")),
            ),
            ("vllm serve --port 1 meta-llama/Llama-2-7b", None),
            (
                "vllm serve --port 1 --model meta-llama/Llama-2-7b",
                Some(("meta-llama", "meta-llama/Llama-2-7b")),
            ),
            ("vllm serve", None),
            (
                "python -m vllm.entrypoints.openai.api_server --model mistralai/Mistral-7B-v0.1",
                Some(("mistralai", "mistralai/Mistral-7B-v0.1")),
            ),
            (
                "python3 -m vllm.entrypoints.openai.api_server --model=facebook/opt-125m",
                Some(("facebook", "facebook/opt-125m")),
            ),
            ("vllm serve gpt2", Some(("", "gpt2"))),
            (
                "vllm serve /models/meta-llama/Llama-2",
                Some(("meta-llama", "meta-llama/Llama-2")),
            ),
            // lm_eval
            (
                "lm_eval --model hf --model_args pretrained=EleutherAI/pythia-160m,dtype=float16 --tasks hellaswag",
                Some(("EleutherAI", "EleutherAI/pythia-160m")),
            ),
            (
                "lm_eval --model vllm --model_args dtype=auto,pretrained=google/gemma-2b --tasks x",
                Some(("google", "google/gemma-2b")),
            ),
            (
                "lm-eval --model hf --model_args=pretrained=microsoft/phi-2",
                Some(("microsoft", "microsoft/phi-2")),
            ),
            ("python -m lm_eval --model hf --tasks mmlu", None),
            ("lm_eval --model hf --model_args dtype=float16", None),
            (
                "lm_eval --model_args {\"pretrained\": \"deepseek-ai/deepseek-llm-7b-base\", \"dtype\": \"bfloat16\"} --tasks gsm8k",
                Some(("deepseek-ai", "deepseek-ai/deepseek-llm-7b-base")),
            ),
            ("lm_eval --model_args {\"dtype\": \"bfloat16\"}", None),
            (
                "lm_eval --model hf --model_args pretrained=/data/models/llama-7b",
                Some(("", "llama-7b")),
            ),
            // SGLang, TGI, Hugging Face
            (
                "python -m sglang.launch_server --model-path Qwen/Qwen2-7B-Instruct --port 30000",
                Some(("Qwen", "Qwen/Qwen2-7B-Instruct")),
            ),
            (
                "text-generation-launcher --model-id bigscience/bloom-560m --num-shard 1",
                Some(("bigscience", "bigscience/bloom-560m")),
            ),
            (
                "python run_clm.py --model_name_or_path openai-community/gpt2 --do_train",
                Some(("openai-community", "openai-community/gpt2")),
            ),
            (
                "accelerate launch train.py --model-name-or-path=google/t5-small",
                Some(("google", "google/t5-small")),
            ),
            // Generic --model
            (
                "python serve.py --model codellama/CodeLlama-7b-Instruct-hf",
                Some(("codellama", "codellama/CodeLlama-7b-Instruct-hf")),
            ),
            (
                "python serve.py --model= --model other/thing",
                Some(("other", "other/thing")),
            ),
            ("python serve.py --model=", None),
            ("python serve.py --model --port 8000", None),
            ("python serve.py --model", None),
            ("python serve.py --model-path-extra x", None),
            ("python train.py --models a/b", None),
            // Local paths
            (
                "vllm serve /root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B/snapshots/0e9e39f",
                Some(("meta-llama", "meta-llama/Llama-3.1-8B")),
            ),
            (
                "python serve.py --model ./checkpoints/run-7/",
                Some(("", "run-7")),
            ),
            ("python serve.py --model /llama", Some(("", "llama"))),
            ("python serve.py --model /", None),
            // Nothing to find
            ("python train.py --epochs 3", None),
            ("sleep 30", None),
            ("", None),
        ];
        for (command, expected) in cases {
            let expected = expected.map(|(p, m)| (p.to_owned(), m.to_owned()));
            assert_eq!(detect(command), expected, "command: {command}");
        }
    }

    #[test]
    fn model_path_is_not_mistaken_for_model() {
        let args: Vec<String> = ["sglang", "--model-path", "a/b", "--model", "c/d"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(detect_from_args(&args).unwrap().model, "a/b");
    }

    #[test]
    fn a_command_in_one_argument_is_split() {
        let args = vec![
            "bash".to_owned(),
            "-c".to_owned(),
            "vllm serve meta-llama/Llama-2-7b --port 8000".to_owned(),
        ];
        assert_eq!(
            detect_from_args(&args),
            Some(ModelInfo {
                provider: "meta-llama".into(),
                model: "meta-llama/Llama-2-7b".into(),
            })
        );
    }

    #[test]
    fn this_test_process_serves_no_model() {
        assert_eq!(detect_for_pid(std::process::id()), None);
        assert_eq!(detect_for_pid(1), None);
        assert_eq!(detect_for_pid(0), None);
    }
}
