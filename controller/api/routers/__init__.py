"""The tablet API's routes, one router per area, included in this order by the app factory.

Each router only translates HTTP to calls on the controller (``deps.ControllerApi``)
and back; no clinical decision is made here.
"""
