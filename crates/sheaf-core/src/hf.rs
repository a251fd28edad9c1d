//! (1.5.) A model as Hugging Face transformers saves it, as a compute backend
//! describes it ([`crate::ComputeBackend::hf_layout`]): what the host needs to write
//! a transformers directory from a checkpoint, and to read one back.

/// (1.5.) A model as transformers saves it: its `config.json`, and for each
/// parameter of the model's [`ParamLayout`](crate::ParamLayout), in that order, its tensor's name in
/// `model.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct HfLayout {
    /// `config.json` (a JSON object).
    pub config: String,
    pub tensors: Vec<HfTensor>,
}

/// (1.5.) Where one parameter goes in a transformers checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// The tensor's name there.
    pub name: String,
    /// Other names a file may hold it under (a base model's, saved without the
    /// head's prefix), tried in order when `name` is missing.
    pub aliases: Vec<String>,
    /// Stored transposed (`[in, out]`: GPT-2's `Conv1D`) rather than as the
    /// parameter's `[out, in]`.
    pub transposed: bool,
}
