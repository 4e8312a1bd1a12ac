/* The relay's per-packet loop in C: the compiled half of relay_worker/fastpath.py.
 *
 * A Router belongs to a worker's table of local clients (Relay.clients) and serves one read at a
 * time: reads are handled one after another on the worker's loop. route(data, pos) walks the complete frames of `data` from `pos` for as
 * long as each is a SendPacket of a valid size whose destination is a local client, and files it
 * under that client; it returns where it stopped: at the first frame it leaves to Python (any other
 * type, an invalid size, a destination not on this worker) or at the first incomplete frame.
 * take(key) then builds, per destination, one bytes object holding that destination's RecvPacket
 * frames (header, the reading client's key as source, packet) in arrival order, and returns them
 * with the counts.
 *
 * Everything a frame can mean besides "relay this to a local key" stays in Python (session.py),
 * which is also the reference: with this module absent the same loop runs there.
 *
 * Memory: a read's frames are recorded as (destination, offset, length) in one array that grows
 * with the read (bounded by the read size / 37 bytes); the reads' buffers are held until take().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <structmember.h>

#define HEADER_LEN 5
#define KEY_LEN 32
#define SEND_PACKET 0x04
#define RECV_PACKET 0x05
#define MAX_BUFFERS 8

typedef struct {
    Py_ssize_t target; /* index into Router.targets */
    const char *start; /* the packet, after the destination key */
    Py_ssize_t length;
} Record;

typedef struct {
    PyObject_HEAD
    PyObject *clients; /* dict: 32-byte key -> client */
    Py_ssize_t max_packet;
    Py_ssize_t min_burst; /* a frame charges min(its length, this) to the client's read limit */
    /* this read's state, emptied by take() */
    Record *records;
    Py_ssize_t n_records, cap_records;
    PyObject *targets;      /* list of clients, in first-seen order */
    Py_ssize_t *sizes;      /* bytes of frames per target */
    Py_ssize_t *counts;     /* frames per target */
    Py_ssize_t cap_targets;
    Py_buffer buffers[MAX_BUFFERS];
    int n_buffers;
    Py_ssize_t payload_bytes;
    Py_ssize_t charged;
} Router;

static void release_read(Router *self) {
    for (int i = 0; i < self->n_buffers; i++) {
        PyBuffer_Release(&self->buffers[i]);
    }
    self->n_buffers = 0;
    self->n_records = 0;
    self->payload_bytes = 0;
    self->charged = 0;
    if (self->targets != NULL && PyList_GET_SIZE(self->targets) > 0) {
        PyList_SetSlice(self->targets, 0, PyList_GET_SIZE(self->targets), NULL);
    }
}

static int Router_init(Router *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"clients", "max_packet", "min_burst", NULL};
    PyObject *clients;
    Py_ssize_t max_packet, min_burst;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nn", kwlist, &PyDict_Type, &clients, &max_packet,
                                     &min_burst)) {
        return -1;
    }
    Py_INCREF(clients);
    Py_XSETREF(self->clients, clients);
    self->max_packet = max_packet;
    self->min_burst = min_burst;
    if (self->targets == NULL && (self->targets = PyList_New(0)) == NULL) {
        return -1;
    }
    return 0;
}

static int Router_traverse(Router *self, visitproc visit, void *arg) {
    Py_VISIT(self->clients);
    Py_VISIT(self->targets);
    return 0;
}

static int Router_clear(Router *self) {
    release_read(self);
    Py_CLEAR(self->clients);
    Py_CLEAR(self->targets);
    return 0;
}

static void Router_dealloc(Router *self) {
    PyObject_GC_UnTrack(self);
    Router_clear(self);
    PyMem_Free(self->records);
    PyMem_Free(self->sizes);
    PyMem_Free(self->counts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* index of `client` in this read's targets, appended when new; -1 on error */
static Py_ssize_t target_index(Router *self, PyObject *client, Py_ssize_t last) {
    Py_ssize_t n = PyList_GET_SIZE(self->targets);
    if (last >= 0 && PyList_GET_ITEM(self->targets, last) == client) {
        return last;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyList_GET_ITEM(self->targets, i) == client) {
            return i;
        }
    }
    if (n == self->cap_targets) {
        Py_ssize_t cap = self->cap_targets ? 2 * self->cap_targets : 8;
        Py_ssize_t *sizes = PyMem_Realloc(self->sizes, cap * sizeof(Py_ssize_t));
        if (sizes == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->sizes = sizes;
        Py_ssize_t *counts = PyMem_Realloc(self->counts, cap * sizeof(Py_ssize_t));
        if (counts == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->counts = counts;
        self->cap_targets = cap;
    }
    if (PyList_Append(self->targets, client) < 0) {
        return -1;
    }
    self->sizes[n] = 0;
    self->counts[n] = 0;
    return n;
}

static int add_record(Router *self, Py_ssize_t target, const char *start, Py_ssize_t length) {
    if (self->n_records == self->cap_records) {
        Py_ssize_t cap = self->cap_records ? 2 * self->cap_records : 64;
        Record *records = PyMem_Realloc(self->records, cap * sizeof(Record));
        if (records == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->records = records;
        self->cap_records = cap;
    }
    Record *r = &self->records[self->n_records++];
    r->target = target;
    r->start = start;
    r->length = length;
    self->sizes[target] += HEADER_LEN + KEY_LEN + length;
    self->counts[target] += 1;
    self->payload_bytes += length;
    self->charged += KEY_LEN + length < self->min_burst ? KEY_LEN + length : self->min_burst;
    return 0;
}

static PyObject *Router_route(Router *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "route(data, pos)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* a read's buffer is held once, however many runs of it are routed */
    int held = self->n_buffers > 0 && self->buffers[self->n_buffers - 1].obj == args[0];
    if (!held && self->n_buffers == MAX_BUFFERS) {
        return PyLong_FromSsize_t(pos); /* Python takes the rest of this read */
    }
    Py_buffer *view = &self->buffers[held ? self->n_buffers - 1 : self->n_buffers];
    if (!held && PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *data = view->buf;
    Py_ssize_t end = view->len, start = pos, last = -1;
    if (pos < 0 || pos > end) {
        if (!held) {
            PyBuffer_Release(view);
        }
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    while (end - pos >= HEADER_LEN && data[pos] == SEND_PACKET) {
        Py_ssize_t length = ((Py_ssize_t)data[pos + 1] << 24) | ((Py_ssize_t)data[pos + 2] << 16) |
                            ((Py_ssize_t)data[pos + 3] << 8) | (Py_ssize_t)data[pos + 4];
        if (length < KEY_LEN || length - KEY_LEN > self->max_packet || end - pos - HEADER_LEN < length) {
            break;
        }
        PyObject *dst = PyBytes_FromStringAndSize((const char *)data + pos + HEADER_LEN, KEY_LEN);
        if (dst == NULL) {
            goto error;
        }
        PyObject *client = PyDict_GetItemWithError(self->clients, dst); /* borrowed */
        Py_DECREF(dst);
        if (client == NULL) {
            if (PyErr_Occurred()) {
                goto error;
            }
            break;
        }
        last = target_index(self, client, last);
        if (last < 0 || add_record(self, last, (const char *)data + pos + HEADER_LEN + KEY_LEN,
                                   length - KEY_LEN) < 0) {
            goto error;
        }
        pos += HEADER_LEN + length;
    }
    if (!held) {
        if (pos == start) {
            PyBuffer_Release(view); /* nothing of it recorded: no need to hold it */
        } else {
            self->n_buffers++;
        }
    }
    return PyLong_FromSsize_t(pos);
error:
    if (!held) {
        self->n_buffers++; /* records may point into it: kept until take(), clear() or dealloc */
    }
    return NULL;
}

static PyObject *Router_take(Router *self, PyObject *arg) {
    Py_buffer key;
    if (PyObject_GetBuffer(arg, &key, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (key.len != KEY_LEN) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "take(key): the source key must be 32 bytes");
        return NULL;
    }
    char source[KEY_LEN];
    memcpy(source, key.buf, KEY_LEN);
    PyBuffer_Release(&key);
    Py_ssize_t n = PyList_GET_SIZE(self->targets);
    PyObject *batches = PyList_New(0);
    if (batches == NULL) {
        return NULL;
    }
    char **cursor = PyMem_Malloc((n ? n : 1) * sizeof(char *));
    if (cursor == NULL) {
        Py_DECREF(batches);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        cursor[i] = NULL;
        if (self->counts[i] == 0) {
            continue; /* all of its frames were discarded */
        }
        PyObject *frames = PyBytes_FromStringAndSize(NULL, self->sizes[i]);
        PyObject *item = frames == NULL ? NULL
                                        : Py_BuildValue("(ONn)", PyList_GET_ITEM(self->targets, i), frames,
                                                        self->counts[i]);
        if (item == NULL || PyList_Append(batches, item) < 0) {
            Py_XDECREF(item);
            PyMem_Free(cursor);
            Py_DECREF(batches);
            return NULL;
        }
        Py_DECREF(item);
        cursor[i] = PyBytes_AS_STRING(frames);
    }
    for (Py_ssize_t k = 0; k < self->n_records; k++) {
        Record *r = &self->records[k];
        char *out = cursor[r->target];
        Py_ssize_t size = KEY_LEN + r->length;
        out[0] = RECV_PACKET;
        out[1] = (char)(size >> 24);
        out[2] = (char)(size >> 16);
        out[3] = (char)(size >> 8);
        out[4] = (char)size;
        memcpy(out + HEADER_LEN, source, KEY_LEN);
        memcpy(out + HEADER_LEN + KEY_LEN, r->start, r->length);
        cursor[r->target] = out + HEADER_LEN + size;
    }
    PyMem_Free(cursor);
    Py_ssize_t packets = self->n_records, payload_bytes = self->payload_bytes, charged = self->charged;
    release_read(self);
    return Py_BuildValue("(Nnnn)", batches, packets, payload_bytes, charged);
}

/* Forget the frames recorded from `payload`'s position on: the reading connection stopped at that
 * frame (a protocol error, or it closed), and nothing it sent after it may be relayed. They stay
 * charged to its read limit, as every frame of a read is in the Python loop. */
static PyObject *Router_discard_from(Router *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const char *from = view.buf;
    PyBuffer_Release(&view);
    Py_ssize_t keep = self->n_records;
    while (keep > 0 && self->records[keep - 1].start >= from) {
        keep--;
    }
    for (Py_ssize_t k = keep; k < self->n_records; k++) {
        Record *r = &self->records[k];
        self->sizes[r->target] -= HEADER_LEN + KEY_LEN + r->length;
        self->counts[r->target] -= 1;
        self->payload_bytes -= r->length; /* still charged: the read limit counts what was read */
    }
    self->n_records = keep;
    Py_RETURN_NONE;
}

static PyObject *Router_clear_read(Router *self, PyObject *Py_UNUSED(ignored)) {
    release_read(self);
    Py_RETURN_NONE;
}

static PyMemberDef Router_members[] = {
    {"pending", T_PYSSIZET, offsetof(Router, n_records), READONLY, "frames recorded since the last take()"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Router_methods[] = {
    {"route", (PyCFunction)(void (*)(void))Router_route, METH_FASTCALL,
     "route(data, pos) -> pos: file the run of locally routable SendPacket frames from pos"},
    {"take", (PyCFunction)Router_take, METH_O,
     "take(key) -> ([(client, frames, count)], packets, payload_bytes, charged): this read's batches"},
    {"discard_from", (PyCFunction)Router_discard_from, METH_O,
     "discard_from(payload): forget the frames recorded from this payload's position on"},
    {"clear", (PyCFunction)Router_clear_read, METH_NOARGS, "clear(): forget this read's frames"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RouterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay_worker._fastpath.Router",
    .tp_basicsize = sizeof(Router),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Router(clients, max_packet, min_burst): a worker's SendPacket routing to local clients, in C",
    .tp_traverse = (traverseproc)Router_traverse,
    .tp_clear = (inquiry)Router_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Router_init,
    .tp_dealloc = (destructor)Router_dealloc,
    .tp_methods = Router_methods,
    .tp_members = Router_members,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay_worker._fastpath",
    .m_doc = "The relay's per-packet loop in C.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&RouterType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&RouterType);
    if (PyModule_AddObject(module, "Router", (PyObject *)&RouterType) < 0) {
        Py_DECREF(&RouterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
