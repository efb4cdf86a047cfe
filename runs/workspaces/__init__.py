"""Agent-run workspaces: confined file tools, on-disk storage, zip export and the command sandbox.

Framework-light on purpose: the agent loop and the executor call these functions; settings are read at call time.
"""

from runs.workspaces.export import ExportTooLarge, zip_chunks
from runs.workspaces.files import (
    FileChange,
    delete_file,
    edit_file,
    list_files,
    read_file,
    read_text,
    tree,
    usage,
    write_file,
)
from runs.workspaces.paths import WorkspaceError, confine
from runs.workspaces.sandbox import (
    CommandLimits,
    CommandResult,
    SandboxStatus,
    SandboxUnavailable,
    run_command,
    sandbox_status,
)
from runs.workspaces.storage import (
    project_workspace_create,
    project_workspace_delete,
    project_workspace_ids_on_disk,
    project_workspace_path,
    workspace_create,
    workspace_delete,
    workspace_ids_on_disk,
    workspace_path,
)

__all__ = [
    "CommandLimits",
    "CommandResult",
    "ExportTooLarge",
    "FileChange",
    "SandboxStatus",
    "SandboxUnavailable",
    "WorkspaceError",
    "confine",
    "delete_file",
    "edit_file",
    "list_files",
    "project_workspace_create",
    "project_workspace_delete",
    "project_workspace_ids_on_disk",
    "project_workspace_path",
    "read_file",
    "read_text",
    "run_command",
    "sandbox_status",
    "tree",
    "usage",
    "workspace_create",
    "workspace_delete",
    "workspace_ids_on_disk",
    "workspace_path",
    "write_file",
    "zip_chunks",
]
