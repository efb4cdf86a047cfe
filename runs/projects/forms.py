"""Dashboard forms for projects: they check shape and show errors; ``runs.projects.services`` (and the GitHub
services) decide and write. Field names match the services' ``ValidationError`` fields, so ``apply_service_errors``
puts each message under its field."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from django import forms

from keys.models import ProviderKey
from orgs.forms import DashboardForm
from runs.forms import RunCreateForm, key_choice_label
from runs.models import Project
from runs.projects.services import DESCRIPTION_MAX_CHARS, NAME_MAX_CHARS
from runs.services import MODEL_MAX_CHARS


class ProjectForm(DashboardForm):
    """Create or edit a project: name, description, and the key and model its runs use unless told otherwise."""

    name = forms.CharField(label="Name", max_length=NAME_MAX_CHARS)
    description = forms.CharField(
        label="Description",
        required=False,
        max_length=DESCRIPTION_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 3}),
    )
    default_provider_key = forms.ChoiceField(label="Default provider key", required=False, choices=())
    default_model = forms.CharField(
        label="Default model",
        required=False,
        max_length=MODEL_MAX_CHARS,
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off", "placeholder": "e.g. gpt-4o-mini"}),
        help_text="Runs on the project, including those a GitHub delivery starts, use this key and model.",
    )

    def __init__(self, *args: Any, provider_keys: Sequence[ProviderKey], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        key_field = cast(forms.ChoiceField, self.fields["default_provider_key"])
        key_field.choices = [("", "No default"), *((str(key.id), key_choice_label(key)) for key in provider_keys)]

    @classmethod
    def initial_for(cls, project: Project) -> dict[str, str]:
        return {
            "name": project.name,
            "description": project.description,
            "default_provider_key": str(project.default_provider_key_id or ""),
            "default_model": project.default_model,
        }


class ProjectRunForm(RunCreateForm):
    """The new-run form of the runs page, for an agent run on one project: no kind (always an agent), and the key
    and model start at the project's defaults; an empty model falls back to the project's default model."""

    def __init__(
        self,
        *args: Any,
        project: Project,
        provider_keys: Sequence[ProviderKey],
        models_by_key: Mapping[str, Sequence[str]],
        **kwargs: Any,
    ) -> None:
        initial: dict[str, Any] = dict(kwargs.pop("initial", None) or {})
        key_id = str(project.default_provider_key_id or "")
        if key_id and any(str(key.id) == key_id for key in provider_keys):
            initial.setdefault("provider_key", key_id)
        if project.default_model:
            # Preselect it in the key's list when the list offers it; otherwise it goes in the free-text field.
            listed = project.default_model in models_by_key.get(key_id, ())
            initial.setdefault("model" if listed else "custom_model", project.default_model)
        super().__init__(*args, provider_keys=provider_keys, models_by_key=models_by_key, initial=initial, **kwargs)
        del self.fields["kind"]
        self.default_model = project.default_model
        self.fields["objective"].help_text = (
            "Kept as the run's title. The agent's steps are streamed to you and never stored; the files it "
            "writes stay in the project's workspace."
        )

    def clean(self) -> dict[str, Any]:
        cleaned = self.cleaned_data
        if self.default_model and not cleaned.get("model") and not str(cleaned.get("custom_model") or "").strip():
            cleaned["custom_model"] = self.default_model
        return super().clean()


class ProjectDeleteForm(DashboardForm):
    """Typed confirmation: deleting a project deletes its workspace at once, so the name must be typed."""

    confirm_name = forms.CharField(
        label="Type the project's name to confirm",
        max_length=NAME_MAX_CHARS + 50,
        widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
    )

    def __init__(self, *args: Any, project: Project, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.project = project

    def clean_confirm_name(self) -> str:
        typed = str(self.cleaned_data.get("confirm_name") or "").strip()
        if typed != self.project.name:
            raise forms.ValidationError("That is not the project's name: nothing was deleted.")
        return typed


class GitHubConnectForm(DashboardForm):
    """Connect a repository. Whether ``owner/name`` and the label are acceptable is the service's call."""

    repository = forms.CharField(
        label="Repository",
        max_length=200,
        widget=forms.TextInput(attrs={"placeholder": "owner/name", "spellcheck": "false", "autocomplete": "off"}),
        help_text="The GitHub repository whose webhook deliveries may start runs on this project.",
    )
    label = forms.CharField(
        label="Label",
        max_length=50,
        initial="cesaflow",
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off"}),
        help_text="Adding this label to an issue starts a run on it. So does a comment starting with /cesaflow "
        "from an owner, member or collaborator.",
    )
