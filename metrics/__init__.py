"""Detection metrics: VOC AP (voc.py), COCO AP through pycocotools (coco.py), the Open Images
challenge metric and submission CSV (oid/), and the metrics JSON evaluate.py writes (metrics_file.py)."""
