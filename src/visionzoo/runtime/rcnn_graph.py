"""Faster R-CNN and Mask R-CNN as one exportable graph: image in, boxes, scores, labels (and masks) out.

The two-stage counterpart of `detection_graph.py`'s `DetectorGraph`, with the same transform,
per-class NMS and scaling back to the input's pixels (shared from there), and every size taken
from the tensors so that the exported file takes an image of any height and width:

1. the transform and backbone (`graph_input`), named pyramid levels as the model names them;
2. the region proposal network: per level, the best `rpn_pre_nms_top_n_test` objectness logits,
   their anchors' boxes decoded and clipped to the resized image; proposals narrower or lower
   than 1e-3 px or below `rpn_score_thresh` dropped; NMS within each level (one
   `NonMaxSuppression` over boxes shifted apart by level) keeping the first
   `rpn_post_nms_top_n_test`;
3. multi-scale RoIAlign: each proposal's level by the FPN rule (`ops.poolers.map_levels`), then one
   ONNX `RoiAlign` per level (`coordinate_transformation_mode` `output_half_pixel`, torchvision's
   `aligned=False`, with the pooler's sampling ratio; opset 16 or later) on that level's boxes,
   the pooled rows put back in the proposals' order;
4. box head and predictor, a box per proposal and non-background class decoded and clipped, those
   scoring above `box_score_thresh` and at least 1e-2 px wide and high, NMS per class keeping the
   first `box_detections_per_img`;
5. Mask R-CNN: the mask branch on the kept boxes (14x14 RoIAlign, mask head, predictor) and each
   detection's own class's mask probabilities, (D, 1, 28, 28) in its box.

Pasting the masks into the image stays outside the graph: the runtime does it after running the
file (`detection_graph.graph_detections`, with `ops.paste_masks_in_image` as the eager model
uses), from the boxes in the input's pixels. Keypoint R-CNN is refused (its heatmap decoding
resizes each heatmap to its box's size: not exported yet).

In eager mode `roi_align_one_level` is `ops.roi_align_levels` on one map, so the traced function
itself reproduces the model (`RCNNGraph(model)(image[None])`). What can differ from the eager model
and why: NMS always shifts boxes apart by level or class, where the eager `batched_nms` runs class
by class above 1,000 boxes (the shifted coordinates round differently in float32); ties may be
visited in another order by the runtime's TopK and NMS. Compared as sets (`compare_detections`).
The pooler's level scales are read at trace time (1/4 ... 1/32 for any padded size); the eager
pooler infers them per image, which gives other values only for images resized to a few pixels
on one side (an extreme aspect ratio squeezed by `max_size`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..models.detection.rcnn import RCNN
from ..models.detection.retinanet import flatten_level
from ..models.detection.roi_heads import MIN_DETECTION_SIZE
from ..models.detection.rpn import MIN_PROPOSAL_SIZE
from ..models.detection.transform import ImageBatch
from ..ops.poolers import MultiScaleRoIAlign, infer_scale, map_levels
from ..ops.roi_align import roi_align_levels
from .detection_graph import as_int, class_nms, clip_boxes, graph_input, to_input_pixels

ROI_ALIGN_OP = "visionzoo::roi_align_one_level"
ROI_ALIGN_OPSET = 16  # the first with RoiAlign's coordinate_transformation_mode
_registered: list[bool] = []


@torch.library.custom_op(ROI_ALIGN_OP, mutates_args=())
def roi_align_one_level(features: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, output_height: int,
                        output_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign of the (K, 4) `boxes` of the one image of `features` (1, C, H, W): (K, C, out_h, out_w). In
    eager mode `ops.roi_align_levels`; in an ONNX graph the `RoiAlign` operator."""
    rois = torch.cat((boxes.new_zeros((boxes.shape[0], 1)), boxes), dim=1)
    return roi_align_levels([features], [spatial_scale], rois, None, (output_height, output_width), sampling_ratio,
                            aligned).contiguous()


@roi_align_one_level.register_fake
def _roi_align_fake(features: torch.Tensor, boxes: torch.Tensor, spatial_scale: float, output_height: int,
                    output_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    return features.new_empty((boxes.shape[0], features.shape[1], output_height, output_width))


def _roi_align_onnx(g, features, boxes, spatial_scale, output_height, output_width, sampling_ratio, aligned):
    count = g.op("Gather", g.op("Shape", boxes), g.op("Constant", value_t=torch.tensor([0])), axis_i=0)
    batch_indices = g.op("ConstantOfShape", count, value_t=torch.tensor([0], dtype=torch.int64))
    return g.op("RoiAlign", features, boxes, batch_indices, mode_s="avg", output_height_i=output_height,
                output_width_i=output_width, sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale,
                coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel")


def register_onnx_roi_align() -> None:
    """Teach torch's TorchScript-based ONNX exporter to write `roi_align_one_level` as `RoiAlign`."""
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    register_custom_op_symbolic(ROI_ALIGN_OP, parse_args("v", "v", "f", "i", "i", "i", "b")(_roi_align_onnx),
                                ROI_ALIGN_OPSET)
    _registered.append(True)


class RCNNGraph(nn.Module):
    """`model` (Faster or Mask R-CNN, any backbone) as a function of one image: `(1, 3, H, W)` in [0, 1] ->
    boxes (K, 4), scores (K,), labels (K,) int64 and, for Mask R-CNN, masks (K, 1, 28, 28) in the boxes."""

    def __init__(self, model: RCNN):
        super().__init__()
        if not isinstance(model, RCNN):
            raise InputError(f"RCNNGraph takes a Faster or Mask R-CNN, got {type(model).__name__}")
        if model.roi_heads.has_keypoint:
            raise InputError(f"{model.arch or type(model).__name__} cannot be exported yet: Keypoint R-CNN's "
                             f"heatmap decoding is not in the graph (Faster and Mask R-CNN export); use the torch "
                             f"backend")
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        heads = model.roi_heads
        original, size, padded = graph_input(model, images)
        features = model.named_features(model.backbone(padded))
        proposals = self._proposals(list(features.values()), padded, size)
        pooled = self._pool(heads.box_roi_pool, features, proposals, size)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        boxes, scores, labels = self._detections(class_logits, box_regression, proposals, size)
        out = (to_input_pixels(boxes, original, size), scores, labels)
        pool, head, predictor = heads.mask_roi_pool, heads.mask_head, heads.mask_predictor
        if pool is None or head is None or predictor is None:  # (no mask branch: Faster R-CNN)
            return out
        probs = predictor(head(self._pool(pool, features, boxes, size))).sigmoid()
        index = labels.view(-1, 1, 1, 1).expand(-1, 1, probs.shape[2], probs.shape[3])
        return (*out, probs.gather(1, index))

    def _proposals(self, features: list[torch.Tensor], padded: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        rpn = self.model.rpn
        logits, deltas = rpn.head(features)
        anchors = rpn.anchor_generator(ImageBatch(padded, [(0, 0)]), features)[0]
        boxes, scores, levels = [], [], []
        start = 0
        for level, (logit, delta) in enumerate(zip(logits, deltas, strict=True)):
            objectness = flatten_level(logit, 1).reshape(-1)
            regression = flatten_level(delta, 4).reshape(-1, 4)
            count = objectness.shape[0]
            level_anchors = anchors[start:start + count]
            start = start + count
            k = torch.clamp(torch._shape_as_tensor(objectness)[0], max=rpn.pre_nms_top_n.test)
            top_logits, top = objectness.topk(as_int(k))
            decoded = rpn.box_coder.decode(regression[top], level_anchors[top])
            boxes.append(clip_boxes(decoded, size[0], size[1]))
            scores.append(torch.sigmoid(top_logits))
            levels.append(torch.full_like(top, level))
        all_boxes, all_scores, all_levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        keep = torch.where(_wide_enough(all_boxes, MIN_PROPOSAL_SIZE) & (all_scores >= rpn.score_thresh))[0]
        all_boxes, all_scores, all_levels = all_boxes[keep], all_scores[keep], all_levels[keep]
        return all_boxes[class_nms(all_boxes, all_scores, all_levels, rpn.nms_thresh, rpn.post_nms_top_n.test)]

    def _pool(self, pooler: MultiScaleRoIAlign, features: dict[str, torch.Tensor], boxes: torch.Tensor,
              size: torch.Tensor) -> torch.Tensor:
        """`pooler`'s pooling of `boxes` (K, 4), one `RoiAlign` per level. The levels' scales are the
        pooler's, read from the traced image: powers of two that every padded image size shares."""
        maps = [v for k, v in features.items() if k in pooler.featmap_names]
        # the (unpadded) resized size, as the eager pooler infers the scales; tracing freezes them
        image_size = [int(s) for s in size.tolist()]
        scales = [infer_scale(m.shape[-2:], image_size) for m in maps]
        out_h, out_w = pooler.output_size
        if len(maps) == 1:
            return roi_align_one_level(maps[0], boxes, scales[0], out_h, out_w, pooler.sampling_ratio, False)
        k_min, k_max = int(-math.log2(scales[0])), int(-math.log2(scales[-1]))
        levels = map_levels([boxes], k_min, k_max, pooler.canonical_scale, pooler.canonical_level)
        pieces, rows = [], []
        for level, feature in enumerate(maps):
            chosen = torch.where(levels == level)[0]
            pieces.append(roi_align_one_level(feature, boxes[chosen], scales[level], out_h, out_w,
                                              pooler.sampling_ratio, False))
            rows.append(chosen)
        return torch.cat(pieces)[torch.argsort(torch.cat(rows))]  # back in the order of the boxes

    def _detections(self, class_logits: torch.Tensor, box_regression: torch.Tensor, proposals: torch.Tensor,
                    size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = self.model.roi_heads
        classes = class_logits.shape[-1]
        decoded = heads.box_coder.decode(box_regression, proposals)  # (K, 4 * classes)
        boxes = clip_boxes(decoded.reshape(-1, 4), size[0], size[1]).reshape(-1, classes, 4)[:, 1:].reshape(-1, 4)
        probs = torch.softmax(class_logits, -1)
        labels = torch.arange(classes, device=probs.device)[None].expand_as(probs)[:, 1:].reshape(-1)
        scores = probs[:, 1:].reshape(-1)
        keep = torch.where((scores > heads.score_thresh) & _wide_enough(boxes, MIN_DETECTION_SIZE))[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = class_nms(boxes, scores, labels, heads.nms_thresh, heads.detections_per_img)
        return boxes[keep], scores[keep], labels[keep]


def _wide_enough(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
