"""The model summary at the start of training, without a column of zeros."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class ModelPartsSummary(RichModelSummary):
    """Lightning's rich summary without its FLOPs column, and with the eval-mode count explained.

    Lightning counts FLOPs by running a module's ``example_input_array``; our modules take whole
    batches and define none, so that column read 0 for every part. ``TrainingThroughput`` counts
    the training step's real FLOPs and logs them as ``perf/tflops_per_sec``.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            numeric = name in ("Params", "Params per Device", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if numeric else "left", style="dim" if name == " " else None,
                             no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        lines = [
            f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}",
            f"[bold]Non-trainable params[/]: {get_human_readable_count(int(frozen))}",
            f"[bold]Total params[/]: {get_human_readable_count(int(total_parameters))}",
            f"[bold]Total estimated model params size (MB)[/]: {get_formatted_model_size(model_size)}",
            f"[bold]Modules in train mode[/]: {total_training_modes['train']}",
            f"[bold]Modules in eval mode[/]: {total_training_modes['eval']} (the frozen parts: eval mode is intended)",
        ]
        console.print("\n".join(lines))
