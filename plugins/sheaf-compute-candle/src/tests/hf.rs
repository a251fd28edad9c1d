//! The GPT as transformers' GPT2LMHeadModel: its names, which tensors are stored
//! transposed, its config.json both ways, and what is refused.

use sheaf_core::{ComputeBackend, ModelSpec};

use crate::CandleBackend;

fn spec(extra: &str) -> ModelSpec {
    let mut s = ModelSpec::new(
        "gpt",
        format!(r#"{{"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 6{extra}}}"#),
    );
    s.vocab_size = Some(50257);
    s
}

#[test]
fn gpt_layout_is_gpt2lmheadmodels() {
    let backend = CandleBackend::new("cpu").unwrap();
    let s = spec(r#", "vocab_size": 50304, "gelu": "tanh""#);
    let hf = backend.hf_layout(&s).unwrap();
    let layout = backend.describe(&s).unwrap().layout;
    assert_eq!(hf.tensors.len(), layout.specs().len());
    for (t, p) in hf.tensors.iter().zip(layout.specs()) {
        assert_eq!(t.name, p.name, "nanoGPT's names are transformers' names");
        let conv1d = ["c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight"]
            .iter()
            .any(|s| p.name.ends_with(s));
        assert_eq!(t.transposed, conv1d, "{}", p.name);
        assert_eq!(t.aliases, vec![p.name.strip_prefix("transformer.").unwrap().to_string()]);
    }
    let config: serde_json::Value = serde_json::from_str(&hf.config).unwrap();
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!((config["n_positions"].as_u64(), config["vocab_size"].as_u64()), (Some(6), Some(50304)));
    assert_eq!(
        (config["tie_word_embeddings"].as_bool(), config["eos_token_id"].as_u64()),
        (Some(true), Some(50256))
    );

    // The config read back is the model it came from.
    let back = backend.hf_model(&hf.config).unwrap();
    assert_eq!(back.kind, "gpt");
    let settings: serde_json::Value = serde_json::from_str(&back.config).unwrap();
    let want = serde_json::json!({"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 6, "vocab_size": 50304,
        "bias": true, "tie_embeddings": true, "gelu": "tanh"});
    assert_eq!(settings, want);
    let untied = backend.hf_layout(&spec(r#", "tie_embeddings": false"#)).unwrap();
    assert_eq!(
        untied.tensors.last().map(|t| (t.name.as_str(), t.aliases.len())),
        Some(("lm_head.weight", 0))
    );
}

#[test]
fn what_the_gpt_does_not_compute_is_refused_by_key() {
    let backend = CandleBackend::new("cpu").unwrap();
    let e = backend.hf_layout(&spec(r#", "bias": false"#)).unwrap_err().to_string();
    assert!(e.contains("model.bias") && e.contains("GPT2LMHeadModel"), "{e}");
    let e = backend.hf_layout(&ModelSpec::new("mlp", "{}")).unwrap_err().to_string();
    assert!(e.contains("`mlp` models have no Hugging Face"), "{e}");
    let gpt2 = serde_json::json!({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "n_positions": 6,
        "vocab_size": 50257, "activation_function": "gelu_new"});
    assert!(backend.hf_model(&gpt2.to_string()).is_ok());
    for (key, value, says) in [
        ("activation_function", serde_json::json!("relu"), "`relu`"),
        ("n_inner", serde_json::json!(16), "4 n_embd"),
        ("layer_norm_epsilon", serde_json::json!(1e-6), "1e-5"),
        ("scale_attn_by_inverse_layer_idx", serde_json::json!(true), "does not compute"),
        ("n_head", serde_json::json!(3), "not divisible by n_head = 3"),
    ] {
        let mut c = gpt2.clone();
        c[key] = value;
        let e = backend.hf_model(&c.to_string()).unwrap_err().to_string();
        assert!(e.contains(key) || key == "n_head" && e.contains("n_embd"), "{key}: {e}");
        assert!(e.contains(says), "{key}: {e}");
    }
    let llama = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama"});
    let e = backend.hf_model(&llama.to_string()).unwrap_err().to_string();
    assert!(e.contains("LlamaForCausalLM") && e.contains("reads GPT2LMHeadModel"), "{e}");
    let e = backend.hf_model("not json").unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("not JSON"), "{e}");
}
