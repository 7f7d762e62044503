"""The page: a side panel (input, model, run, thresholds, lesions, downloads) beside the views.

Only layout here; every control is bound to a state variable or a controller of ``app``.
Element ids are stable: the browser tests use them.
"""

from __future__ import annotations

from typing import Any

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html, vuetify3 as v3

from NormativeAnomalyLib.options import MIN_LESION_MM3_MAX
from NormativeAnomalyLib.run_folder import ANOMALY_MAP, LESIONS_CSV, PSEUDO_HEALTHY, SEGMENTATION, UNCERTAINTY_MAP

from .files import FileAccess

# (what, button, file of export.export_result, MIME type)
DOWNLOADS = (("segmentation", "Segmentation (.seg.nrrd)", SEGMENTATION, "application/octet-stream"),
             ("anomaly_map", "Anomaly map", ANOMALY_MAP, "application/gzip"),
             ("pseudo_healthy", "Pseudo-healthy", PSEUDO_HEALTHY, "application/gzip"),
             ("lesions", "Lesion table (.csv)", LESIONS_CSV, "text/csv"),
             ("uncertainty", "Uncertainty map", UNCERTAINTY_MAP, "application/gzip"))


def initial_state(models: list[dict[str, Any]], files: FileAccess) -> dict[str, Any]:
    return {
        "volumes": [], "volume": None, "upload": None, "input_name": "",
        "models": [{"title": f"{m['name']} ({m.get('family') or '?'}, {m.get('modality') or '?'})",
                    "value": m["name"]} for m in models],
        "model": None, "model_card": [],
        "running": False, "progress": 0, "status": "", "error": "",
        "results": [], "result": None, "has_result": False, "has_uncertainty": False,
        "threshold": 0.0, "threshold_max": 1.0, "threshold_step": 0.001, "fpr_percent": None,
        "min_size": 0.0, "overlay_opacity": 0.5, "fade": 0.0, "show_uncertainty": False,
        "lesions": [], "selected_lesion": None, "summary": "", "segment_voxels": 0,
        "max_upload_mb": files.max_upload_bytes / 2**20,
    }


def card_lines(model: dict[str, Any] | None) -> list[str]:
    """The model card summary (what the Slicer panel shows under its selector), as plain lines."""
    if not model:
        return []
    dims = f", {model['dims']}D" if model.get("dims") else ""
    lines = [f"{model['name']} {model.get('version') or ''}: {model.get('family') or '?'}, "
             f"{model.get('modality') or '?'}{dims}"]
    for label, key in (("Trained on", "training_data"), ("Licence", "license"), ("", "description")):
        if model.get(key):
            lines.append(f"{label}: {model[key]}" if label else str(model[key]))
    return lines


def lesion_rows(rows: list[dict]) -> list[dict[str, Any]]:
    return [{"id": row["ID"], "volume": f"{row['Volume']:.3f}", "max": f"{row['Max score']:.2f}",
             "status": row["Status"]} for row in rows]


def build(server, layout_manager, max_upload_bytes: int) -> None:
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("NormativeAnomaly")
        with layout.toolbar:
            v3.VSpacer()
            html.Span("{{ status }}", id="status", classes="text-body-2 mr-4")
        with layout.drawer as drawer:
            drawer.width = 380
            with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                _input_section(max_upload_bytes)
                _model_section()
                _results_section()
                _lesion_section()
                _download_section()
        with layout.content:
            with html.Div(style="width: 100%; height: calc(100vh - 64px);"):
                layout_manager.initialize_layout_grid(layout)


def _input_section(max_upload_bytes: int) -> None:
    html.Div("Input", classes="text-subtitle-2")
    with html.Div(classes="d-flex ga-2 align-center"):
        # A listed volume, or a path typed in (the server reads it only inside its shared folders).
        v3.VCombobox(v_model=("volume",), items=("volumes",), label="Volume on the server", density="compact",
                     hide_details=True, id="volume-select", disabled=("running",))
        v3.VBtn("Load", id="load-button", click="trigger('load_volume')", disabled=("running || !volume",),
                density="compact")
    # Client-side guard: a file over the limit is never sent (the server checks again).
    v3.VFileInput(label="or upload (.nii, .nii.gz, .nrrd, .mha; up to {{ max_upload_mb }} MB)", density="compact",
                  hide_details=True, id="upload-input", disabled=("running",), show_size=True,
                  update_modelValue=(
                      "(f => { const x = Array.isArray(f) ? f[0] : f; if (!x) return; "
                      f"if (x.size > {int(max_upload_bytes)}) {{ error = x.name + ': over the upload limit'; }} "
                      "else { upload = x; } })($event)"))
    html.Div("{{ input_name ? 'Input: ' + input_name : 'No volume loaded' }}", id="input-name",
             classes="text-body-2")


def _model_section() -> None:
    html.Div("Model", classes="text-subtitle-2 mt-2")
    v3.VSelect(v_model=("model",), items=("models",), density="compact", hide_details=True, id="model-select",
               disabled=("running",))
    html.Div("{{ model_card[0] }}", classes="text-caption", id="model-card")
    with v3.VExpansionPanels(variant="accordion", density="compact"):
        with v3.VExpansionPanel(title="Model card", density="compact"):
            with v3.VExpansionPanelText():
                html.Div("{{ line }}", v_for="line in model_card.slice(1)", classes="text-caption mb-1")
    with html.Div(classes="d-flex ga-2"):
        v3.VBtn("Run", id="run-button", color="primary", click="trigger('run')",
                disabled=("running || !input_name",))
        v3.VBtn("Cancel", id="cancel-button", click="trigger('cancel')", disabled=("!running",))
    v3.VProgressLinear(model_value=("progress",), v_show="running", height=6, id="progress")
    v3.VAlert(v_show="error", text=("error",), type="error", density="compact", closable=True, id="error",
              click_close="error = ''")


def _results_section() -> None:
    with html.Div(v_if="has_result", classes="d-flex flex-column ga-1"):
        html.Div("Result and thresholds", classes="text-subtitle-2 mt-2")
        v3.VSelect(v_model=("result",), items=("results",), label="Result (model)", density="compact",
                   hide_details=True, id="result-select")
        v3.VSlider(v_model=("threshold",), min=0, max=("threshold_max",), step=("threshold_step",),
                   label="Threshold", density="compact", hide_details=True, id="threshold-slider")
        html.Div("threshold {{ Number(threshold).toFixed(3) }}: healthy false-positive rate "
                 "{{ fpr_percent === null ? '-' : Number(fpr_percent).toPrecision(2) }} %",
                 classes="text-caption", id="fpr-label")
        v3.VTextField(label="Set by healthy false-positive rate (%), Enter", density="compact", hide_details=True,
                      id="fpr-input", __events=[("keydown_enter", "keydown.enter")],
                      keydown_enter="trigger('set_fpr', [$event.target.value])")
        v3.VSlider(v_model=("min_size",), min=0, max=MIN_LESION_MM3_MAX, step=10, label="Min. size (mm³)",
                   density="compact", hide_details=True, id="min-size-slider")
        v3.VSlider(v_model=("overlay_opacity",), min=0, max=1, step=0.05, label="Overlay", density="compact",
                   hide_details=True, id="opacity-slider")
        v3.VSlider(v_model=("fade",), min=0, max=1, step=0.05, label="Input ↔ pseudo-healthy",
                   density="compact", hide_details=True, id="fade-slider")
        v3.VCheckbox(v_model=("show_uncertainty",), label="Show uncertainty", density="compact",
                     hide_details=True, disabled=("!has_uncertainty",), id="uncertainty-checkbox")


def _lesion_section() -> None:
    with html.Div(v_if="has_result"):
        html.Div("Lesions", classes="text-subtitle-2 mt-2")
        html.Div("{{ summary }}", id="lesion-summary", classes="text-body-2",
                 __properties=[("data_voxels", "data-voxels")], data_voxels=("segment_voxels",))
        with v3.VTable(density="compact", height="220px", fixed_header=True, id="lesion-table"):
            with html.Thead():
                with html.Tr():
                    for title in ("ID", "Volume (mL)", "Max score", "Status", ""):
                        html.Th(title)
            with html.Tbody():
                with html.Tr(v_for="row in lesions", key="row.id", click="trigger('centre_lesion', [row.id])",
                             classes=("{'bg-blue-lighten-4': row.id === selected_lesion, 'text-disabled': "
                                      "row.status === 'rejected'}",),
                             style="cursor: pointer", __properties=[("data_lesion", "data-lesion")],
                             data_lesion=("row.id",)):
                    html.Td("{{ row.id }}")
                    html.Td("{{ row.volume }}")
                    html.Td("{{ row.max }}")
                    html.Td("{{ row.status }}")
                    with html.Td():
                        # A plain button: a hundred Vuetify buttons would slow every slider step in the browser.
                        html.Button("{{ row.status === 'rejected' ? 'Restore' : 'Reject' }}",
                                    classes="reject-button text-caption text-primary",
                                    click=("$event.stopPropagation(); "
                                           "trigger('reject_lesion', [row.id, row.status !== 'rejected'])"))


def _download_section() -> None:
    with html.Div(v_if="has_result", classes="d-flex flex-wrap ga-1"):
        html.Div("Download", classes="text-subtitle-2 mt-2 w-100")
        for what, label, filename, mime in DOWNLOADS:
            v3.VBtn(label, size="small", id=f"download-{what}", v_if="has_uncertainty" if what == "uncertainty" else None,
                    click=f"utils.download('{filename}', trigger('download', ['{what}']), '{mime}')")
