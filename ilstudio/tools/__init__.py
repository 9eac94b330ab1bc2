"""Command-line tools around the configuration, each run with ``python -m``:

``ilstudio.tools.diff`` (what differs between two runs or config files), ``ilstudio.tools.docs``
(README's parameter tables from the declarations) and ``ilstudio.tools.yaml_to_gin`` (migrate
an older YAML training file).
"""
