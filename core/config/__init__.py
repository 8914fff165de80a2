"""The params schema, one module per section (so a stage's code deps are the sections it reads).

    base       Section, ConfigError, model names, params_hash
    project paths data model train tune gate export serve   one section each
    overrides  `-S key=value`, and validation against a schema passed in
    params     the root `Params` (every section), load_params / build_params: for entry points only

This package's __init__ imports nothing: importing one section must not import the others.
"""
