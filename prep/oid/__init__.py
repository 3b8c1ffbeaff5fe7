"""The stages of the Open Images converter, prep/openimages.py (the script, its options and ``main``).

- classes.py: the class descriptions, ``--classes`` and the hierarchy's MIDs;
- csv_stream.py: the box and image-label CSVs, streamed into compact columns;
- images.py: image headers (size, EXIF orientation, missing / unreadable), box orientation, image ids,
  the image folder (link or copy);
- convert.py: boxes and labels of readable images, grouped by image, and their JSON records;
- write.py: the annotation file (a chunk of images at a time), the hierarchy, the class bins;
- summary.py: the summary dict ``main`` returns and its printed form.
"""
