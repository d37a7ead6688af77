"""The paper's other downstream tasks on top of a pre-trained ALBEF: SNLI-VE, NLVR2 (with its
text-assignment step) and VQA (answer decoder, ranking over a fixed answer list).

Architecture in ``heads`` / ``models``, loss math in ``losses``, one objective per task in
``objective``, data in ``data``, the loop in ``finetune`` and a whole stage in ``run``.
"""
