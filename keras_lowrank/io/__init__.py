"""Files: adapter-only files and how adapted models travel as `.keras` files.

- `adapter_files`: the verbs `save_adapter`, `load_adapter`,
  `read_adapter_config`;
- `adapter_format`: the adapter-file config, its checksums and checks;
- `layer_match`: which model layer each file entry belongs to;
- `safetensors_io`: the one module that reads and writes safetensors and
  writes files atomically;
- `manifest`: the adapter manifest inside a `.keras` file;
- `keras_file`: the adapted model class (`.keras`, pickle, `clone_model`,
  `load_weights`, `.h5`) and `load_model`.
"""
