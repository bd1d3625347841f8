/* The KVM probe guest (agent/drivers/kvm_probe.py holds its bytes; rebuild:
 *   as --32 -o p.o kvm_probe.S && ld -m elf_i386 -Ttext=0x100000 --oformat binary -o p.bin p.o
 * tests/unit/test_kvm_probe.py checks the two agree).
 *
 * A multiboot image (QEMU -kernel) that enters long mode, copies 32 MiB
 * byte by byte (rep movsb, as a kernel decompressor moves memory), sums
 * 1..100000, prints K on the serial port and leaves through isa-debug-exit
 * (QEMU exits with status 3). Under working KVM it takes milliseconds and
 * about a second under TCG; where /dev/kvm is a nested hypervisor that
 * emulates such loops it takes tens of seconds (26 s on the 2-core EPYC
 * this was written on, where Debian kernels then never finish booting).
 */
        .code32
        .set BASE, 0x100000
        .text
        .globl _start
_start:
hdr:    .long 0x1BADB002
        .long 0x00010000
        .long -(0x1BADB002 + 0x00010000)
        .long BASE            # header_addr
        .long BASE            # load_addr
        .long BASE + (end - hdr)   # load_end_addr
        .long BASE + 0x4000 + (end - hdr) # bss_end_addr (page tables)
        .long BASE + (entry - hdr) # entry_addr
entry:
        cli
        # page tables at BASE+0x2000.. (PML4, PDPT, PD), 1 GiB identity with 2 MiB pages
        mov $(BASE + 0x2000), %edi
        mov %edi, %esi
        xor %eax, %eax
        mov $(0x3000/4), %ecx
        rep stosl
        mov %esi, %edi
        lea 0x1003(%esi), %eax
        mov %eax, (%edi)          # PML4[0] -> PDPT
        lea 0x2003(%esi), %eax
        mov %eax, 0x1000(%edi)    # PDPT[0] -> PD
        mov $0x83, %eax
        lea 0x2000(%esi), %edi
        mov $512, %ecx
1:      mov %eax, (%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 1b
        mov %esi, %cr3
        mov %cr4, %eax
        or $0x20, %eax            # PAE
        mov %eax, %cr4
        mov $0xC0000080, %ecx
        rdmsr
        or $0x100, %eax           # LME
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax      # PG | PE
        mov %eax, %cr0
        lgdt BASE + (gdtr - hdr)
        ljmp $0x08, $(BASE + (long64 - hdr))
        .code64
long64:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %ss
        # work in long mode, as a kernel's decompressor does: copy 32 MiB
        # byte by byte (16 MiB up to 48 MiB), then sum 1..100000
        mov $0x1000000, %rsi
        mov $0x3000000, %rdi
        mov $0x2000000, %rcx
        cld
        rep movsb
        xor %rax, %rax
        mov $100000, %rcx
2:      add %rcx, %rax
        loop 2b
        movabs $5000050000, %rbx
        cmp %rbx, %rax
        jne 3f
        mov $0x3f8, %dx
        mov $'K', %al
        out %al, %dx
        mov $0x501, %dx
        mov $1, %al
        out %al, %dx              # isa-debug-exit: QEMU exits with status 3
3:      hlt
        jmp 3b
        .align 8
gdt:    .quad 0
        .quad 0x00209A0000000000  # 64-bit code
        .quad 0x0000920000000000  # data
gdtr:   .word gdtr - gdt - 1
        .long BASE + (gdt - hdr)
end:
