"""Pictures: activation heatmaps over images, image grids and small charts, shared by app and reports."""

from traitscope.viz.heatmap import MAX_ALPHA, fit_thumbnail, heat_rgba, image_grid, overlay_heatmap, patch_index_maps
from traitscope.viz.plots import figure_to_image, ratings_histogram

__all__ = ["MAX_ALPHA", "figure_to_image", "fit_thumbnail", "heat_rgba", "image_grid", "overlay_heatmap",
           "patch_index_maps", "ratings_histogram"]
