//! The GPT as transformers' `GPT2LMHeadModel`: nanoGPT's parameter names are
//! transformers' own; its four linear layers per block are stored transposed there
//! (GPT-2's `Conv1D` keeps `[in, out]`), and `config.json` carries the shape.

use serde_json::{json, Value};
use sheaf_core::{Error, HfLayout, HfTensor, ModelSpec, Result};

use super::spec::{Gelu, GptSpec};

/// transformers' names for the architecture.
pub(crate) const ARCHITECTURE: &str = "GPT2LMHeadModel";
const MODEL_TYPE: &str = "gpt2";

/// transformers' layout of `spec`'s GPT.
pub(crate) fn layout(spec: &ModelSpec) -> Result<HfLayout> {
    let g = GptSpec::parse(spec)?;
    if !g.bias {
        return Err(Error::config(
            "model.bias",
            "false: transformers' GPT2LMHeadModel has biases in every linear layer and LayerNorm; export a GPT with bias = true",
        ));
    }
    let mut config = json!({
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": g.vocab_size,
        "n_positions": g.block_size,
        "n_ctx": g.block_size,
        "n_embd": g.n_embd,
        "n_layer": g.n_layer,
        "n_head": g.n_head,
        "n_inner": null,
        "activation_function": match g.gelu { Gelu::Erf => "gelu", Gelu::Tanh => "gelu_new" },
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": g.tie_embeddings,
        "torch_dtype": "float32",
    });
    // GPT-2's tokenizer's end-of-text, where the vocabulary has it.
    if g.vocab_size > 50256 {
        config["bos_token_id"] = 50256.into();
        config["eos_token_id"] = 50256.into();
    }
    let tensors = g
        .layout()
        .specs()
        .iter()
        .map(|p| {
            let transposed =
                [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"]
                    .iter()
                    .any(|s| p.name.ends_with(s));
            // A base model's file (GPT2Model, as the hub's `gpt2` ships) has no prefix.
            let aliases = p.name.strip_prefix("transformer.").map(String::from).into_iter().collect();
            HfTensor { name: p.name.clone(), aliases, transposed }
        })
        .collect();
    Ok(HfLayout { config: serde_json::to_string_pretty(&config).expect("JSON"), tensors })
}

/// Whether a `config.json` is GPT-2's.
pub(crate) fn describes(config: &Value) -> bool {
    config["model_type"] == MODEL_TYPE
        || config["architectures"].as_array().is_some_and(|a| a.iter().any(|x| x == ARCHITECTURE))
}

/// The `[model]` settings of the GPT a GPT-2 `config.json` describes; what Sheaf's
/// GPT does not compute is an error naming the key.
pub(crate) fn model(config: &Value) -> Result<ModelSpec> {
    let key = |k: &str| format!("config.json: {k}");
    let size = |k: &str| -> Result<usize> {
        config[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::config(key(k), format!("{} is not a whole number", config[k])))
    };
    let (n_embd, n_head, n_layer) = (size("n_embd")?, size("n_head")?, size("n_layer")?);
    let block_size = size("n_positions")?;
    let vocab_size = size("vocab_size")?;
    let gelu = match config["activation_function"].as_str().unwrap_or("gelu_new") {
        "gelu" => "erf",
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => "tanh",
        other => {
            return Err(Error::config(
                key("activation_function"),
                format!("`{other}`: Sheaf's GPT computes GELU exactly (gelu) or as GPT-2 (gelu_new)"),
            ))
        }
    };
    if !(config["n_inner"].is_null() || config["n_inner"].as_u64() == Some(4 * n_embd as u64)) {
        return Err(Error::config(
            key("n_inner"),
            format!("{}: Sheaf's GPT's MLP is 4 n_embd wide", config["n_inner"]),
        ));
    }
    let eps = config["layer_norm_epsilon"].as_f64().unwrap_or(1e-5);
    if (eps - 1e-5).abs() > 1e-12 {
        return Err(Error::config(
            key("layer_norm_epsilon"),
            format!("{eps}: Sheaf's GPT's LayerNorm uses 1e-5"),
        ));
    }
    for k in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"] {
        if config[k].as_bool() == Some(true) {
            return Err(Error::config(key(k), "true: Sheaf's GPT does not compute it"));
        }
    }
    if config["scale_attn_weights"].as_bool() == Some(false) {
        return Err(Error::config(
            key("scale_attn_weights"),
            "false: Sheaf's GPT scales attention by 1/sqrt(head size)",
        ));
    }
    let settings = json!({
        "n_layer": n_layer,
        "n_head": n_head,
        "n_embd": n_embd,
        "block_size": block_size,
        "vocab_size": vocab_size,
        "bias": true,
        "tie_embeddings": config["tie_word_embeddings"].as_bool().unwrap_or(true),
        "gelu": gelu,
    });
    let spec = ModelSpec { kind: "gpt".into(), config: settings.to_string(), vocab_size: None };
    GptSpec::parse(&spec)?;
    Ok(spec)
}
